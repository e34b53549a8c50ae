//! The two timestamp forms a message may carry: milliseconds since the Unix epoch as a JSON
//! integer, or an RFC 3339 date-time string (`2024-05-01T12:00:00.5Z`, `...+02:00`).
//!
//! Only the form is checked; the value is forwarded as sent.

/// Why a timestamp is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimestampError {
    #[error("must be milliseconds since the epoch (a non-negative integer) or an RFC 3339 string")]
    WrongType,
    #[error("is not an RFC 3339 date-time: {0:?}")]
    NotRfc3339(String),
}

/// Check a timestamp given as the raw JSON text of its value.
pub fn check_timestamp(raw: &str) -> Result<(), TimestampError> {
    let raw = raw.trim();
    if raw.starts_with('"') {
        let s: String = serde_json::from_str(raw).map_err(|_| TimestampError::WrongType)?;
        if is_rfc3339(&s) {
            Ok(())
        } else {
            Err(TimestampError::NotRfc3339(s))
        }
    } else if !raw.is_empty()
        && raw.bytes().all(|b| b.is_ascii_digit())
        && raw.parse::<u64>().is_ok()
    {
        Ok(())
    } else {
        Err(TimestampError::WrongType)
    }
}

/// `full-date "T" full-time` of RFC 3339 section 5.6 (`t` and a space are accepted for `T`).
fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 20 {
        return false;
    }
    let num = |from: usize, len: usize| -> Option<u32> {
        let part = b.get(from..from + len)?;
        part.iter().all(u8::is_ascii_digit).then(|| {
            part.iter()
                .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'))
        })
    };
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) = (
        num(0, 4),
        num(5, 2),
        num(8, 2),
        num(11, 2),
        num(14, 2),
        num(17, 2),
    ) else {
        return false;
    };
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return false;
    }
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    if day == 0 || day > days || hour > 23 || minute > 59 || second > 60 {
        return false;
    }
    let mut rest = &b[19..];
    if rest.first() == Some(&b'.') {
        let digits = rest[1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return false;
        }
        rest = &rest[1 + digits..];
    }
    match rest {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => {
            let all = [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit());
            all && (h1 - b'0') * 10 + (h2 - b'0') <= 23 && (m1 - b'0') * 10 + (m2 - b'0') <= 59
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_and_rfc3339_strings_are_accepted() {
        for ok in [
            "0",
            "1700000000000",
            "\"2024-02-29T23:59:60Z\"",
            "\"2024-05-01t12:00:00.123456+02:00\"",
            "\"2024-05-01 12:00:00-07:30\"",
        ] {
            assert_eq!(check_timestamp(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn everything_else_is_refused() {
        for bad in [
            "-1",
            "1.5",
            "1e3",
            "true",
            "null",
            "{}",
            "\"\"",
            "\"2023-02-29T00:00:00Z\"",
            "\"2024-13-01T00:00:00Z\"",
            "\"2024-05-01T24:00:00Z\"",
            "\"2024-05-01T12:00:00\"",
            "\"2024-05-01T12:00:00.Z\"",
            "\"2024-05-01T12:00:00+2:00\"",
            "\"2024-05-01T12:00:00Zjunk\"",
            "99999999999999999999999",
        ] {
            assert!(check_timestamp(bad).is_err(), "{bad}");
        }
    }
}
