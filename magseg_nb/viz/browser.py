"""A headless-Chromium driver that opens a saved map.html and reports what a user would see.

Used by notebook 06 (``figures/map.png``) and the map tests; it is a check, not a figure.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import websocket  # websocket-client, installed with JupyterLab

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
_LAYER_STATE_JS = (
    "JSON.stringify([...document.querySelectorAll('.layer-switcher-ctrl a, .layer-switcher-ctrl button, "
    ".layer-switcher-ctrl div > *')].filter(e => !e.children.length)"
    ".map(e => [e.textContent.trim(), e.classList.contains('active')]))"
)


def browser_check(
    html_path: Path,
    screenshot_path: Path | None = None,
    wait_s: float = 6.0,
    click: tuple[float, float] | None = None,
    chromium: str = CHROMIUM,
    size: tuple[int, int] = (1200, 800),
) -> dict:
    """Open a saved map in headless Chromium (DevTools protocol, real time so MapLibre's workers run).

    Returns ``layers`` ({name: visible} from the page's layer switcher, which asks the map itself),
    ``canvas`` (a MapLibre canvas exists), ``popup`` (text of the popup after clicking at the
    fractional position ``click`` of the map's canvas), ``errors`` (uncaught page exceptions), and writes a PNG.
    """

    if not Path(chromium).exists():
        raise FileNotFoundError(
            f"{chromium} not found: install Debian's chromium (bash scripts/setup.sh --browser)"
        )
    profile = tempfile.mkdtemp(prefix="magseg-chromium-")
    proc = subprocess.Popen(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            f"--window-size={size[0]},{size[1]}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"{chromium} did not open its DevTools port within 30 s")
        port = port_file.read_text().split()[0]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10))
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        counter, errors = [0], []

        def call(method, **params):
            counter[0] += 1
            ws.send(json.dumps({"id": counter[0], "method": method, "params": params}))
            while True:
                msg = json.loads(ws.recv())
                if msg.get("method") == "Runtime.exceptionThrown":
                    errors.append(msg["params"]["exceptionDetails"].get("text", ""))
                if msg.get("id") == counter[0]:
                    return msg.get("result", {})

        call("Runtime.enable")
        call("Page.enable")
        call(
            "Emulation.setDeviceMetricsOverride",
            width=size[0],
            height=size[1],
            deviceScaleFactor=1,
            mobile=False,
        )
        call("Page.navigate", url=Path(html_path).resolve().as_uri())
        time.sleep(wait_s)

        def evaluate(expr):
            return call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")

        layers = dict(json.loads(evaluate(_LAYER_STATE_JS) or "[]"))
        canvas = bool(evaluate("!!document.querySelector('canvas.maplibregl-canvas')"))
        popup = None
        if click is not None:
            # fractions of the map's canvas, wherever the page placed it
            box = json.loads(
                evaluate(
                    "JSON.stringify((c => c ? [c.left, c.top, c.width, c.height] : [0, 0, innerWidth, "
                    "innerHeight])(document.querySelector('canvas.maplibregl-canvas')"
                    "?.getBoundingClientRect()))"
                )
            )
            x, y = box[0] + click[0] * box[2], box[1] + click[1] * box[3]
            # On a busy machine the vector tiles may still be loading: click again until a popup
            # shows or ``wait_s`` more seconds have passed.
            deadline = time.time() + wait_s
            while popup is None and time.time() < deadline:
                call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
                for kind in ("mousePressed", "mouseReleased"):
                    call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
                for _ in range(6):
                    time.sleep(0.25)
                    popup = evaluate(
                        "[...document.querySelectorAll('.maplibregl-popup-content')]"
                        ".map(e => e.innerText).join(' | ') || null"
                    )
                    if popup is not None:
                        break
        if screenshot_path is not None:
            shot = call("Page.captureScreenshot", format="png")
            Path(screenshot_path).write_bytes(base64.b64decode(shot["data"]))
        ws.close()
        return {"layers": layers, "canvas": canvas, "popup": popup, "errors": errors}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def chromium_available(chromium: str = CHROMIUM) -> bool:
    """Whether the headless browser is installed (``bash scripts/setup.sh --browser``)."""
    return Path(chromium).exists()
