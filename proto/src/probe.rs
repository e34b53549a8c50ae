//! A dependency-free health probe for container health checks: the images are `FROM scratch`, so
//! there is no curl; each binary runs `--probe URL` on itself instead.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// `GET url` over plain HTTP/1.0; true on a 2xx answer within `timeout`.
/// Only `http://host:port/path` URLs are understood.
pub fn http_get_ok(url: &str, timeout: Duration) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let Some(addr) = authority.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        return false;
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    if stream.read_exact(&mut head).is_err() {
        return false;
    }
    // "HTTP/1.1 200"
    head.starts_with(b"HTTP/1.") && head[9] == b'2'
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve_once(answer: &'static [u8]) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/health", l.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
            let _ = s.write_all(answer);
        });
        url
    }

    #[test]
    fn a_2xx_is_healthy_and_anything_else_is_not() {
        let t = Duration::from_secs(2);
        assert!(http_get_ok(&serve_once(b"HTTP/1.1 200 OK\r\n\r\n"), t));
        assert!(!http_get_ok(
            &serve_once(b"HTTP/1.1 503 Unavailable\r\n\r\n"),
            t
        ));
        assert!(!http_get_ok(&serve_once(b"nonsense"), t));
        assert!(!http_get_ok("http://127.0.0.1:1/health", t));
        assert!(!http_get_ok("ftp://x/", t));
    }
}
