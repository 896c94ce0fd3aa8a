"""The selection page in real headless Chromium: ``LoraModel(interactive_modify=port)`` is built in a thread while
the browser unfolds a repeated block with ``[*]``, clicks module names and submits; the LoRA model must modify
exactly the clicked modules.

Chromium is driven through its DevTools protocol over a pipe (``--remote-debugging-pipe``, the transport Playwright
itself uses): the standard library is enough, there is no driver binary whose version must match the browser's, and
clicks are real input events (``Input.dispatchMouseEvent``) that the browser hit-tests like a user's.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from opendelta import LoraModel
from opendelta.interactive import TIMEOUT_ENV
from opendelta.testing import tiny_model

CHROMIUM = next(
    (found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("OPENDELTA_REQUIRE_BROWSER"),  # the nox session requires it: never skipped
    reason="no chromium binary on PATH; install it (apt-get install -y chromium) or run `nox -s interactive`",
)

L = "bert.encoder.layer"
STEP_TIMEOUT = 30.0

# Finds the one visible name button whose row stands for exactly `paths`, or a button (`cls`) on that row, scrolls it
# into view and returns the centre of its box, for a real mouse click there.
FIND = """(paths, cls) => {
  const rows = [...document.querySelectorAll("button.name")]
    .filter((b) => b.dataset.paths === paths && b.getClientRects().length > 0);
  if (rows.length !== 1) return {error: `${rows.length} visible rows stand for ${paths}`};
  const el = cls === "name" ? rows[0] : rows[0].parentElement.querySelector("." + cls);
  if (!el || el.getClientRects().length === 0) return {error: `no visible .${cls} on the row of ${paths}`};
  el.scrollIntoView({block: "center"});
  const box = el.getBoundingClientRect();
  return {x: box.left + box.width / 2, y: box.top + box.height / 2};
}"""


class Chromium:
    """Headless Chromium with one page, spoken to in DevTools protocol messages (JSON + NUL) over two pipes."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_browser, self._writer = os.pipe()
        self._reader, from_browser = os.pipe()
        # the browser reads commands on fd 3 and writes answers on fd 4: move the pipe ends there in the child
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]
        os.close(to_browser)
        os.close(from_browser)
        args = [
            binary,
            "--headless",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--disable-background-networking",
            "--window-size=1200,900",
            *(["--no-sandbox"] if os.geteuid() == 0 else []),  # Chromium refuses to sandbox as root
            "about:blank",
        ]
        self.log = profile.parent / "chromium.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                # bash, not sh: dash cannot name descriptors above 9 in a redirection
                ["bash", "-c", f'exec "$0" "$@" 3<&{high[0]} 4>&{high[1]} {high[0]}<&- {high[1]}>&-', *args],
                pass_fds=high,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        for fd in high:
            os.close(fd)
        self._buffer = b""
        self._next_id = 0
        self.exceptions: list[str] = []
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.send("Runtime.enable", session=self.session)
        except BaseException:
            self.close()
            raise

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._writer, data) :]
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            reply = self._receive(deadline, method)
            if reply.get("method") == "Runtime.exceptionThrown":
                details = reply["params"]["exceptionDetails"]
                self.exceptions.append(details.get("exception", {}).get("description") or details.get("text", ""))
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise AssertionError(f"DevTools {method} failed: {reply['error']}")
                return reply["result"]

    def _receive(self, deadline: float, method: str) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self._reader], [], [], max(remaining, 0))
            chunk = os.read(self._reader, 1 << 16) if ready else b""
            if not chunk:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise AssertionError(f"Chromium gave no answer to {method} (exit code {self.proc.poll()}):\n{tail}")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(raw)

    def evaluate(self, expression: str) -> Any:
        result = self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}, self.session
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str) -> Any:
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what} ({expression})")

    def click(self, paths: str, cls: str = "name", count: int = 1) -> None:
        """Click (``count=2``: double-click) the name of the row standing for ``paths``, or a button on that row."""
        spot = self.evaluate(f"({FIND})({json.dumps(paths)}, {json.dumps(cls)})")
        assert "error" not in spot, spot["error"]
        point = {"x": spot["x"], "y": spot["y"]}
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", **point}, self.session)
        for n in range(1, count + 1):
            for kind in ("mousePressed", "mouseReleased"):
                event = {"type": kind, "button": "left", "clickCount": n, **point}
                self.send("Input.dispatchMouseEvent", event, self.session)

    def classes(self, paths: str) -> list[str]:
        """The classes of the visible name button standing for ``paths``."""
        return self.evaluate(
            f"[...document.querySelectorAll('button.name')].filter((b) => b.dataset.paths === {json.dumps(paths)} "
            f"&& b.getClientRects().length > 0).map((b) => [...b.classList])[0] || null"
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("Browser.close")
            except (AssertionError, OSError):
                self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._writer)
        os.close(self._reader)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_server(url: str) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(url + "api/tree", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def browser(tmp_path):
    chromium = Chromium(CHROMIUM, tmp_path / "profile")
    try:
        yield chromium
    finally:
        chromium.close()


def test_lora_targets_are_the_modules_clicked_in_the_browser(browser, monkeypatch, capsys):
    monkeypatch.setenv(TIMEOUT_ENV, "120")  # a failing browser step ends the waiting model build, not hangs it
    model = tiny_model("bert")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    built: dict[str, Any] = {}

    def build() -> None:
        try:
            built["delta"] = LoraModel(model, interactive_modify=port, lora_r=4)
        except BaseException as exc:  # reported by the assertions below
            built["error"] = exc

    worker = threading.Thread(target=build, name="build-lora")
    worker.start()
    try:
        wait_for_server(url)
        browser.send("Page.navigate", {"url": url}, browser.session)
        browser.wait_for("document.body && document.body.dataset.ready === 'true'", "the tree to render")

        both = f"{L}.0 {L}.1"
        for paths in ("bert", "bert.encoder", f"{L}", both, f"{L}.0.attention {L}.1.attention"):
            browser.click(paths, "toggle")  # [+]: expand down to the folded layers' attention
        browser.click(f"{L}.0.attention.self {L}.1.attention.self", "toggle")
        qkv = " ".join(f"{L}.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "key", "value"))
        browser.click(qkv, "unfold", count=2)  # the manual's double click on [*] unfolds query,key,value once
        query_both = f"{L}.0.attention.self.query {L}.1.attention.self.query"
        browser.click(query_both)  # selects query in every layer
        assert "selected" in browser.classes(query_both)
        assert "partial" in browser.classes(qkv)  # query of query,key,value is selected in both layers
        assert "inside" in browser.classes(both) and "inside" not in browser.classes("bert.embeddings")

        browser.click(both, "unfold")  # [*]: the layers one by one
        assert browser.classes(both) is not None and browser.classes(f"{L}.1") is not None
        browser.click(f"{L}.1", "toggle")
        browser.click(f"{L}.1.intermediate", "toggle")
        browser.click(f"{L}.1.intermediate")  # greyed out (LoRA modifies linear layers only): nothing happens
        assert "selected" not in browser.classes(f"{L}.1.intermediate")
        browser.click(f"{L}.1.intermediate.dense")
        assert "selected" in browser.classes(f"{L}.1.intermediate.dense")

        browser.click(both, "unfold")  # fold the layers again: the selection shows on the folded rows
        assert browser.classes(f"{L}.1") is None
        browser.click(both, "toggle")
        browser.click(f"{L}.0.intermediate {L}.1.intermediate", "toggle")
        assert "partial" in browser.classes(f"{L}.0.intermediate.dense {L}.1.intermediate.dense")

        expected = [f"{L}.0.attention.self.query", f"{L}.1.attention.self.query", f"{L}.1.intermediate.dense"]
        listed = browser.evaluate("[...document.querySelectorAll('#selection li')].map((li) => li.textContent)")
        assert listed == expected
        browser.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": 1, "y": 1}, browser.session)
        browser.evaluate("document.getElementById('submit').scrollIntoView()")
        box = browser.evaluate(
            "(() => { const b = document.getElementById('submit').getBoundingClientRect(); "
            "return {x: b.left + b.width / 2, y: b.top + b.height / 2}; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            browser.send(
                "Input.dispatchMouseEvent", {"type": kind, "button": "left", "clickCount": 1, **box}, browser.session
            )
        status = browser.wait_for(
            "(() => { const s = document.getElementById('status'); return s.className === 'ok' && s.textContent; })()",
            "the submission to be acknowledged",
        )
        assert "Submitted 3 module(s)" in status
    finally:
        worker.join(5)
        if worker.is_alive():  # the page failed: end the waiting build instead of letting it time out
            urllib.request.urlopen(
                urllib.request.Request(
                    url + "api/cancel", b"{}", headers={"Content-Type": "application/json"}, method="POST"
                ),
                timeout=5,
            ).close()
            worker.join(30)

    assert "error" not in built, built.get("error")
    assert browser.exceptions == []
    delta = built["delta"]
    assert [t.name for t in delta.targets] == expected
    assert delta.config.modified_modules == expected and delta.config.common_structure is False
    assert len(delta.deltas) == 3
    placed = {id(d) for d in delta.deltas}
    for name in expected:  # each delta sits on a clicked module
        assert any(id(c) in placed for c in model.get_submodule(name).children()), name
    assert not any(id(c) in placed for c in model.get_submodule(f"{L}.0.attention.self.key").children())
    out = capsys.readouterr().out
    assert url in out and f"modified_modules: {expected}" in out
