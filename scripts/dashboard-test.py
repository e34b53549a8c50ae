#!/usr/bin/env python3
"""Drive the distributor's dashboard in headless Chromium, as an operator would.

Loads the page, waits for it to show the analyzers, types new weights into the weight inputs and
clicks "Apply weights", then checks the distributor's GET /health for the new weights; switches one
analyzer off and on with its button and checks /health again; checks that every request the page
made went to the distributor (it works offline); saves a screenshot.

Talks the Chrome DevTools Protocol over --remote-debugging-pipe (fd 3 in, fd 4 out, NUL-separated
JSON), so it needs nothing but Python's standard library and Debian's `chromium`.

Usage: scripts/dashboard-test.py --url http://127.0.0.1:8081 --screenshot out.png \
           --weights analyzer-1=0.6,analyzer-2=0.2,analyzer-3=0.2 [--toggle analyzer-3]
Exit status: 0 when every check passed, 1 otherwise (with the reason on stderr).
"""

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

DEADLINE_S = 30


def fail(msg):
    print(f"dashboard-test: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


class Browser:
    """Chromium with a DevTools pipe; one page, attached in flat mode."""

    def __init__(self, binary, profile):
        cmd_r, self._cmd_w = os.pipe()
        self._evt_r, evt_w = os.pipe()

        def wire():
            # Move them out of the way first: a pipe end may already be fd 3 or 4.
            r, w = os.dup(cmd_r), os.dup(evt_w)
            os.dup2(r, 3)
            os.dup2(w, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "--window-size=1400,1000", "about:blank"],
            preexec_fn=wire, close_fds=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(evt_w)
        self._buf = b""
        self._next_id = 0
        self.events = []
        self.session = None

    def send(self, method, params=None, session=True, timeout=DEADLINE_S):
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    fail(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)
        fail(f"no answer to {method} within {timeout} s")

    def _read(self):
        while b"\0" not in self._buf:
            chunk = os.read(self._evt_r, 1 << 16)
            if not chunk:
                fail("chromium closed its DevTools pipe (did it start?)")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\0", 1)
        return json.loads(line)

    def attach_page(self):
        targets = self.send("Target.getTargets", session=False)["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.send("Target.attachToTarget",
                                 {"targetId": page["targetId"], "flatten": True},
                                 session=False)["sessionId"]

    def js(self, expression):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                           "awaitPromise": True})
        if "exceptionDetails" in r:
            fail(f"page script error in {expression!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, what, expression):
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            if self.js(expression):
                return
            time.sleep(0.2)
        fail(f"timed out waiting for {what}")

    def click(self, selector):
        """A real mouse click in the middle of the element, not a scripted .click()."""
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                      " if (!e) return null; e.scrollIntoView({block: 'center'});"
                      " const r = e.getBoundingClientRect();"
                      " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()")
        if box is None:
            fail(f"no element {selector} to click")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box["x"], "y": box["y"],
                                                    "button": "left", "clickCount": 1})

    def type_into(self, selector, text):
        """Focus the input, select what it holds and type over it, as a keyboard would."""
        self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                " e.focus(); e.select(); })()")
        self.send("Input.insertText", {"text": text})

    def close(self):
        try:
            self.send("Browser.close", session=False, timeout=5)
        except SystemExit:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def analyzer_field(base, id_, field):
    for a in get_json(f"{base}/health")["analyzers"]:
        if a["id"] == id_:
            return a[field]
    fail(f"{id_} is not in {base}/health")


def wait_health(base, what, check):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    fail(f"{base}/health never showed {what}: {get_json(base + '/health')}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8081", help="the distributor's base URL")
    p.add_argument("--screenshot", required=True, help="where to save the PNG")
    p.add_argument("--weights", required=True, help="id=w,... to type into the weight inputs")
    p.add_argument("--toggle", help="an analyzer to switch off and back on with its button")
    p.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = p.parse_args()
    base = args.url.rstrip("/")
    weights = {k: float(v) for k, v in (kv.split("=", 1) for kv in args.weights.split(","))}

    with tempfile.TemporaryDirectory() as profile:
        b = Browser(args.chromium, profile)
        try:
            b.attach_page()
            b.send("Network.enable")
            b.send("Page.enable")
            b.send("Page.navigate", {"url": f"{base}/dashboard"})
            b.wait_for("the analyzer table and two polls",
                       f"document.querySelectorAll('#analyzers tr').length === {len(weights)}"
                       " && Number(document.body.dataset.polls || 0) >= 2")
            bars = b.js("document.querySelectorAll('#bars rect.observed').length")
            if bars != len(weights):
                fail(f"the bar chart has {bars} bars, expected {len(weights)}")
            print(f"dashboard-test: page loaded, {bars} analyzers in the table and the chart")

            for id_, w in weights.items():
                b.type_into(f"#weight-{id_}", str(w))
            b.click("#apply-weights")
            wait_health(base, f"weights {weights}",
                        lambda: all(analyzer_field(base, i, "weight") == w
                                    for i, w in weights.items()))
            b.wait_for("the confirmation",
                       "document.getElementById('message').textContent.startsWith('weights applied')")
            print(f"dashboard-test: weights typed and applied; /health shows {weights}")

            if args.toggle:
                sel = f"button[data-id='{args.toggle}']"
                b.click(sel + "[data-action='disable']")
                wait_health(base, f"{args.toggle} disabled",
                            lambda: analyzer_field(base, args.toggle, "enabled") is False)
                b.wait_for("the enable button", f"!!document.querySelector(\"{sel}[data-action='enable']\")")
                b.click(sel + "[data-action='enable']")
                wait_health(base, f"{args.toggle} enabled again",
                            lambda: analyzer_field(base, args.toggle, "enabled") is True)
                print(f"dashboard-test: {args.toggle} switched off and on with its button")

            time.sleep(1.5)  # one more poll, so the screenshot shows the latest state
            png = base64.b64decode(b.send("Page.captureScreenshot", {"format": "png"})["data"])
            os.makedirs(os.path.dirname(os.path.abspath(args.screenshot)), exist_ok=True)
            with open(args.screenshot, "wb") as f:
                f.write(png)
            print(f"dashboard-test: screenshot {args.screenshot} ({len(png)} bytes)")

            urls = {e["params"]["request"]["url"] for e in b.events
                    if e.get("method") == "Network.requestWillBeSent"}
            foreign = sorted(u for u in urls if not u.startswith(base + "/"))
            if foreign:
                fail(f"the page fetched from elsewhere: {foreign}")
            print(f"dashboard-test: all {len(urls)} distinct URLs the page used are on {base}")
        finally:
            b.close()
    print("dashboard-test: PASS")


if __name__ == "__main__":
    main()
