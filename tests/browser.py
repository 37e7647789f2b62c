"""Headless Chromium for the tests that look at a page as a person would: the system's chromium
(Debian's package; Playwright's browser download needs the internet), driven over the DevTools
protocol on a websocket, so the page's scripts run as they do for a user."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

from flows.children import running

NAMES = ("chromium", "chromium-browser", "google-chrome")  # Debian's, Ubuntu's, Google's
CHROMIUM = next(filter(None, map(shutil.which, NAMES)), None)


class Page:
    """One tab (the browser itself where session is None): go to a URL, then wait until a
    JavaScript expression is truthy."""

    def __init__(self, socket: ClientConnection, session: str | None = None) -> None:
        self.socket, self.session = socket, session
        self._ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """A DevTools command in this tab; its result (events in between are skipped)."""
        message_id = next(self._ids)
        message = {"id": message_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        self.socket.send(json.dumps(message))
        while True:
            reply = json.loads(self.socket.recv(timeout=60))
            if reply.get("id") == message_id and reply.get("sessionId") == self.session:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

    def evaluate(self, expression: str) -> Any:
        """The expression's value in the page (JSON-like), promises awaited."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, timeout: float = 60) -> Any:
        """Poll the expression until its value is truthy; fail with the page's text if it is
        not within timeout seconds."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText : ''") or ""
                shown = expression if len(expression) < 600 else expression[:600] + " ..."
                raise AssertionError(f"not seen in {timeout} s: {shown}\npage:\n{text[:3000]}")
            time.sleep(0.25)
        return value


@contextlib.contextmanager
def headless_page(folder: Path) -> Iterator[Page]:
    """A headless Chromium (its profile and log under folder, its DevTools port chosen by
    Chromium and read from the profile) with one blank tab; stopped with its whole session
    (flows.children.running)."""
    profile = folder / "chromium-profile"
    profile.mkdir(parents=True)
    # No sandbox: the pages are the test's own server, and containers (as root, or without user
    # namespaces) often cannot start the sandbox.
    args = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"]  # fmt: skip
    port_file = profile / "DevToolsActivePort"

    def ready() -> bool:
        return port_file.exists() and len(port_file.read_text().split()) >= 2

    try:
        with running(args, env=dict(os.environ), ready=ready, timeout=60,
                     log=folder / "chromium.log", grace=10):  # fmt: skip
            port, path = port_file.read_text().split()[:2]
            with connect(f"ws://127.0.0.1:{port}{path}", max_size=None) as socket:
                browser = Page(socket)
                target = browser.call("Target.createTarget", url="about:blank")["targetId"]
                attached = browser.call("Target.attachToTarget", targetId=target, flatten=True)
                yield Page(socket, attached["sessionId"])
    finally:
        shutil.rmtree(profile, ignore_errors=True)
