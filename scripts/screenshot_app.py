"""Screenshot the Gradio app after a generation: docs/app.png for the README.

Starts the app in this process, opens it in headless Chromium, clicks Generate, waits until the table is
filled and every image has loaded, and saves a full-page PNG. Chromium is driven over the DevTools protocol on
a pipe (``--remote-debugging-pipe``: NUL-separated JSON on fds 3 and 4), so no Python or npm package beyond dq's
own dependencies is needed; only a Chromium binary (Debian: ``apt-get install -y chromium``).

    python scripts/screenshot_app.py                       # ref-sd, default recipes -> docs/app.png
    python scripts/screenshot_app.py --model DIR --recipes w8a8,w4a16 --steps 4 --out /tmp/app.png
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
    "--remote-debugging-pipe",
]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# True once the status line of a finished generation is shown and every image on the page has loaded.
READY_JS = """(() => {
  const status = document.getElementById('dq-status');
  const imgs = [...document.querySelectorAll('img')];
  const pending = document.querySelectorAll('.progress-text, .eta-bar').length;
  return !!status && status.innerText.includes('slider: FP vs') && pending === 0
    && imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
})()"""
STATE_JS = """JSON.stringify({
  status: (document.getElementById('dq-status') || {}).innerText,
  pending: [...document.querySelectorAll('.progress-text, .eta-bar')].map(e => e.className),
  table: (document.getElementById('dq-table') || {}).innerText,
  nimg: document.querySelectorAll('img').length,
  images: [...document.querySelectorAll('img')].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
})"""
ERROR_JS = "(() => { const t = document.querySelector('.toast-body'); return t ? t.innerText : null; })()"


class DevTools:
    """A minimal Chrome DevTools Protocol client over Chromium's debugging pipe, attached to one page."""

    def __init__(self, chromium: str, user_data_dir: str, width: int, height: int) -> None:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def map_fds() -> None:  # the child reads commands on fd 3 and writes replies on fd 4
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self.process = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}"],
            # close_fds would run after preexec_fn and close fds 3 and 4 again; os.pipe() ends are non-inheritable.
            preexec_fn=map_fds, close_fds=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._next_id = 0
        self.session: Optional[str] = None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def send(self, method: str, **params: Any) -> dict:
        """Send a command (to the attached page once there is one) and return its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the debugging pipe (did it start? try running it by hand)")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def evaluate(self, expression: str) -> Any:
        """Evaluate JavaScript in the page and return its value."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, what: str) -> None:
        """Poll ``expression`` until it is truthy; fail with the app's error toast, if any, after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            error = self.evaluate(ERROR_JS)
            if error:
                raise RuntimeError(f"the app reported an error: {error}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; page: {self.evaluate(STATE_JS)}")
            time.sleep(0.5)

    def close(self) -> None:
        """Ask Chromium to quit, then make sure it has."""
        try:
            self.session = None
            self.send("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._to_child)
        os.close(self._from_child)


def find_chromium(explicit: Optional[str]) -> str:
    """The Chromium binary: ``--chromium``, else the first of the usual names on PATH."""
    for name in ([explicit] if explicit else CHROMIUM_NAMES):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("screenshot_app.py: no Chromium found; install it (Debian: apt-get install -y chromium) or pass --chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model to show (default: the app's default, ref-sd)")
    parser.add_argument("--recipes", default="w8a8,w4a8,svdquant-w4a4", help="recipes ticked (comma-separated)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--calib-samples", type=int, default=None, help="calibration prompts (default: each recipe's set)")
    parser.add_argument("--calib-steps", type=int, default=None, help="steps of the calibration runs")
    parser.add_argument("--width", type=int, default=1400, help="page width in CSS pixels (default 1400)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the generation (default 900)")
    parser.add_argument("--chromium", default=None, help="Chromium binary (default: found on PATH)")
    parser.add_argument("--out", type=Path, default=Path("docs/app.png"), help="PNG to write (default docs/app.png)")
    args = parser.parse_args(argv)
    chromium = find_chromium(args.chromium)

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from dq.app import AppConfig, build_demo, launch

    recipes = tuple(r.strip() for r in args.recipes.split(",") if r.strip())
    calib = None
    if args.calib_samples or args.calib_steps:
        from dq import CalibConfig

        given = {"samples": args.calib_samples, "steps": args.calib_steps}
        calib = CalibConfig(**{k: v for k, v in given.items() if v})
    demo = build_demo(AppConfig(model=args.model, device=args.device, steps=args.steps, recipes=recipes, calib=calib))
    _, url, _ = launch(demo, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    with tempfile.TemporaryDirectory(prefix="dq-chromium-") as profile:
        browser = DevTools(chromium, profile, args.width, 1000)
        try:
            browser.send("Page.enable")
            browser.send("Emulation.setDeviceMetricsOverride", width=args.width, height=1000, deviceScaleFactor=1,
                         mobile=False)
            browser.send("Page.navigate", url=url)
            browser.wait_for("!!document.getElementById('dq-generate')", 60, "the app to load")
            browser.evaluate("document.getElementById('dq-generate').click()")
            browser.wait_for(READY_JS, args.timeout, "the generation")
            time.sleep(1.0)  # let the slider and gallery finish their layout transitions
            height = int(browser.evaluate("document.documentElement.scrollHeight"))
            browser.send("Emulation.setDeviceMetricsOverride", width=args.width, height=height, deviceScaleFactor=1,
                         mobile=False)
            time.sleep(0.5)
            png = browser.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        finally:
            browser.close()
            demo.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(base64.b64decode(png))
    print(f"wrote {args.out} ({args.width}x{height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
