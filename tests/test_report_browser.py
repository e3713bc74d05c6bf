"""The web report in a real headless browser (Debian's ``chromium``, driven over the DevTools
protocol on a pipe: no websocket library, no driver, no network): no console errors, no request
leaving the file system, Table 3 sorts by a column, and a screenshot that is not blank.

Skipped, with the reason, only where no chromium is installed (``.ci/run`` installs it)."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medplan.evaluation.aggregate import gather_all_folds
from medplan.report import build_report
from medplan.report.synthetic import make_results_tree

BROWSER = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium installed (apt-get install chromium)")


class DevTools:
    """The Chrome DevTools protocol over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out, NUL-separated JSON)."""

    def __init__(self, profile: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # bash, not sh: dash redirects only one-digit descriptors
        # bash, not sh: dash redirects only one-digit descriptors
        script = f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w}'
        self.proc = subprocess.Popen(
            [shutil.which("bash") or "/bin/bash", "-c", script, BROWSER, "--headless", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--disable-extensions", "--disable-background-networking", "--disable-sync", "--mute-audio",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=1280,1000", "about:blank"],
            pass_fds=(to_browser_r, from_browser_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from the browser")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("the browser closed its pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events[i]
        while True:
            e = self._read(deadline)
            self.events.append(e)
            if e.get("method") == method:
                return e

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


def test_report_in_a_headless_browser(tmp_path, monkeypatch):
    for sub, var in (("raw", "MEDPLAN_RAW"), ("pre", "MEDPLAN_PREPROCESSED"), ("results", "MEDPLAN_RESULTS")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    make_results_tree(tmp_path / "results", raw=tmp_path / "raw", preprocessed=tmp_path / "pre",
                      missing=[("CAMUS", "ukan", 3)], absent=[("CAMUS", "unet", 2, "LA")], cases_per_fold=3,
                      epochs=6, size=24)
    index = build_report(tmp_path / "results", table=gather_all_folds(tmp_path / "results"), num_workers=0)
    tools = DevTools(tmp_path / "profile")
    try:
        target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            tools.send(f"{domain}.enable", session=session)
        tools.send("Page.navigate", {"url": index.as_uri()}, session=session)
        tools.wait_for("Page.loadEventFired")
        # scroll through the page so lazy images load too, then come back to the top
        tools.send("Runtime.evaluate", {"expression": "window.scrollTo(0, document.body.scrollHeight)"},
                   session=session)
        time.sleep(0.5)
        tools.send("Runtime.evaluate", {"expression": "window.scrollTo(0, 0)"}, session=session)

        def js(expression: str):
            out = tools.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
            assert "exceptionDetails" not in out, out
            return out["result"].get("value")

        column = "table.table3[data-dataset=CAMUS] td[data-column=mPrec]"
        before = js(f"Array.from(document.querySelectorAll('{column}')).map(td => td.parentNode.dataset.arch)")
        js("document.querySelector('table.table3[data-dataset=CAMUS] th[data-column=mPrec]').click()")
        values = js(f"Array.from(document.querySelectorAll('{column}')).map(td => Number(td.dataset.value))")
        assert values == sorted(values, reverse=True) and len(values) == 3  # first click: largest first
        js("document.querySelector('table.table3[data-dataset=CAMUS] th[data-column=mPrec]').click()")
        again = js(f"Array.from(document.querySelectorAll('{column}')).map(td => Number(td.dataset.value))")
        assert again == sorted(values)
        assert sorted(before) == sorted(js(f"Array.from(document.querySelectorAll('{column}'))"
                                           ".map(td => td.parentNode.dataset.arch)"))
        broken = js("Array.from(document.images).filter(i => i.complete && i.naturalWidth === 0).map(i => i.src)")
        assert broken == []
        shot = tools.send("Page.captureScreenshot", {"format": "png"}, session=session)
    finally:
        tools.close()

    errors = [e for e in tools.events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error")]
    assert errors == []
    urls = [e["params"]["request"]["url"] for e in tools.events if e.get("method") == "Network.requestWillBeSent"]
    assert urls and all(u.startswith(("file://", "data:", "about:")) for u in urls), urls
    image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    (tmp_path / "screenshot.png").write_bytes(base64.b64decode(shot["data"]))
    pixels = np.asarray(image)
    assert image.size[0] >= 1000 and pixels.std() > 20  # not blank: text, tables and the header bar
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
