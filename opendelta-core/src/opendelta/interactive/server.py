"""The local web server behind interactive selection: standard library only, one instance per selection.

``GET /`` serves the page (``page.html``, package data), ``GET /api/tree`` the module tree as JSON, ``POST
/api/submit`` takes ``{"modules": [real names]}`` and ``POST /api/cancel`` gives up. The original served with
web.py on ``0.0.0.0`` from module-level globals; here every piece of state lives on a :class:`SelectionServer`, it
binds ``127.0.0.1`` unless told otherwise, and closing it stops the serving thread and every request thread.

Two cheap guards keep other web pages out of a loopback server: a POST must carry ``Content-Type:
application/json`` (a cross-site form cannot send that without a CORS preflight, which is never granted), and the
``Host`` header must name the loopback address (against DNS rebinding).
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from opendelta.errors import OpenDeltaError
from opendelta.interactive.errors import (
    InteractiveSelectionCancelled,
    InteractiveSelectionError,
    InteractiveSelectionTimeout,
)
from opendelta.interactive.tree import ModuleNode

__all__ = ["MAX_BODY_BYTES", "SelectionServer"]

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 2**20
"""Largest request body accepted (a selection of every module of a very large model fits many times over)."""
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def _walk(node: ModuleNode) -> list[ModuleNode]:
    """Every node of the tree, folded rows' members included."""
    out = [node]
    for child in [*node.children, *(node.repeats or [])]:
        out.extend(_walk(child))
    return out


class _HTTPServer(ThreadingHTTPServer):
    """Threads per request, and a record of open connections so that closing does not wait on idle ones."""

    daemon_threads = False  # server_close() joins every request thread: nothing is left running
    block_on_close = True

    def __init__(self, address: tuple[str, int], owner: SelectionServer) -> None:
        self.owner = owner
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def end_connections(self) -> None:
        """Shut every open connection down, so request threads blocked reading an idle one return at once."""
        with self._connections_lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    """Routes the four endpoints to the owning :class:`SelectionServer`."""

    server: _HTTPServer
    timeout = 30  # seconds an idle connection may hold its thread
    server_version = "OpenDeltaSelection"

    def do_GET(self) -> None:
        if not self._host_allowed():
            return
        path = urlsplit(self.path).path
        owner = self.server.owner
        if path in ("/", "/index.html"):
            self._send(200, owner.page, "text/html; charset=utf-8")
        elif path == "/api/tree":
            self._send(200, owner.tree_json, "application/json")
        else:
            self._send_json(404, {"error": f"nothing at {path}; the selection page is at /"})

    def do_POST(self) -> None:
        if not self._host_allowed():
            return
        path = urlsplit(self.path).path
        if path not in ("/api/submit", "/api/cancel"):
            self._send_json(404, {"error": f"cannot POST to {path}; use /api/submit or /api/cancel"})
            return
        if self.headers.get_content_type() != "application/json":
            self._send_json(415, {"error": "send the request body as JSON (Content-Type: application/json)"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self._send_json(413, {"error": f"the body must be 0 to {MAX_BODY_BYTES} bytes with a Content-Length"})
            return
        body = self.rfile.read(length)
        owner = self.server.owner
        if path == "/api/cancel":
            with owner._submit_lock:
                self._send_json(200, {"cancelled": not owner._done.is_set()})
                owner._finish(None)
            return
        with owner._submit_lock:  # one submission at a time: a second one sees the first's outcome
            try:
                data = json.loads(body or b"null")
                names = owner._accept(data.get("modules") if isinstance(data, dict) else None)
            except (ValueError, OpenDeltaError) as exc:  # bad JSON, or a selection refused with its reason
                self._send_json(400, {"error": str(exc)})
                return
            except Exception as exc:  # a failing validate callback: tell the page, keep serving
                logger.exception("checking a submitted selection failed")
                self._send_json(500, {"error": f"checking the selection failed: {type(exc).__name__}: {exc}"})
                return
            self._send_json(200, {"modified_modules": names})
            owner._finish(names)  # after the answer is written: closing the server may follow at once

    def _host_allowed(self) -> bool:
        allowed = self.server.owner.allowed_hosts
        if allowed is None or self.headers.get("Host", "") in allowed:
            return True
        self._send_json(
            403,
            {"error": f"Host {self.headers.get('Host')!r} is not this server; open {self.server.owner.url}"},
        )
        return False

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class SelectionServer:
    """Serves one module tree until a selection is submitted or cancelled.

    Use as a context manager (``with SelectionServer(tree) as server: names = server.wait(60)``), or call
    :meth:`start` and :meth:`close`. Nothing is bound before :meth:`start`.

    Args:
        tree: the module tree (:func:`opendelta.interactive.tree.build_tree`).
        order: every real module name in module order; submitted names are returned in this order (default: the
            order they appear in the tree).
        host: the address to listen on; ``127.0.0.1`` keeps the page to this machine. ``0.0.0.0`` exposes it to
            the network (only do that on a trusted one).
        port: the port, or 0 for a free one.
        method: the delta method's name, shown on the page and in messages.
        validate: called with the accepted names before they are returned; an :class:`OpenDeltaError` it raises
            is shown on the page and the user can change the selection.
    """

    def __init__(
        self,
        tree: ModuleNode,
        *,
        order: Sequence[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        method: str | None = None,
        validate: Callable[[list[str]], None] | None = None,
    ) -> None:
        nodes = _walk(tree)
        shown = dict.fromkeys(p for n in nodes for p in n.paths)
        ordered = [n for n in dict.fromkeys(order or ()) if n in shown]
        self._order = {name: i for i, name in enumerate([*ordered, *(n for n in shown if n not in set(ordered))])}
        self._selectable = {p for n in nodes if n.selectable for p in n.paths}
        self._validate = validate
        self.method = method
        self.host = host
        self.port = port
        self.tree_json = json.dumps(
            {"method": method, "model": tree.type, "tree": tree.to_dict(), "modules": list(self._order)}
        ).encode("utf-8")
        self.page = b""
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._submit_lock = threading.Lock()
        self._result: list[str] | None = None

    # ------------------------------------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        """The page's address (after :meth:`start`), with the loopback address when listening on all of them."""
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    @property
    def allowed_hosts(self) -> set[str] | None:
        """``Host`` headers accepted: the loopback names when listening on loopback, else any (``None``)."""
        if self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127."):
            return {f"{name}:{self.port}" for name in (*_LOOPBACK_NAMES, self.host)}
        return None

    def start(self) -> SelectionServer:
        """Bind and serve from a background thread.

        Raises:
            InteractiveSelectionError: the port is taken or cannot be used; the message says what to pass instead.
        """
        if self._httpd is not None:
            raise InteractiveSelectionError(f"this selection server is already serving at {self.url}")
        self.page = resources.files("opendelta.interactive").joinpath("page.html").read_bytes()
        server_class = _HTTPServer6 if ":" in self.host else _HTTPServer
        try:
            httpd = server_class((self.host, self.port), self)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                hint = f"port {self.port} on {self.host} is in use by another program"
            else:
                hint = f"cannot listen on {self.host}:{self.port} ({exc})"
            raise InteractiveSelectionError(
                f"{hint}: pass another port (interactive_modify=<port>), or True to pick a free one"
            ) from exc
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="opendelta-interactive-server"
        )
        self._thread.start()
        return self

    def wait(self, timeout: float) -> list[str]:
        """Block until the page submits (returns the names, in module order) or cancels, at most ``timeout`` s.

        Raises:
            InteractiveSelectionTimeout: nothing was submitted in time.
            InteractiveSelectionCancelled: the page's "cancel" button was pressed.
        """
        if not self._done.wait(timeout):
            raise InteractiveSelectionTimeout(
                f"no selection was submitted at {self.url} within {timeout:g} s; the server is shut down. Allow more "
                f"time (select_modules(timeout=...) or the OPENDELTA_INTERACTIVE_TIMEOUT environment variable, in "
                f"seconds), or pass modified_modules=[...] instead"
            )
        if self._result is None:
            raise InteractiveSelectionCancelled(
                f"the selection at {self.url} was cancelled; pass modified_modules=[...] or select again"
            )
        return list(self._result)

    def close(self) -> None:
        """Stop serving, end open connections and join every thread; safe to call twice."""
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()  # serve_forever returns
        httpd.end_connections()
        httpd.server_close()  # joins the request threads
        if thread is not None:
            thread.join()

    def __enter__(self) -> SelectionServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ called by requests
    def _accept(self, names: Any) -> list[str]:
        """Check a submitted selection; returns it in module order or raises with what to change."""
        if self._done.is_set():
            raise InteractiveSelectionError("a selection was already submitted; go back to your terminal")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InteractiveSelectionError('the request body must be {"modules": ["real.module.name", ...]}')
        unique = list(dict.fromkeys(names))
        if not unique:
            raise InteractiveSelectionError("nothing is selected: click at least one module name, then submit")
        unknown = [n for n in unique if n not in self._order]
        if unknown:
            raise InteractiveSelectionError(
                f"{unknown[:5]!r} {'is' if len(unknown) == 1 else 'are'} not among the modules shown; reload the page"
            )
        refused = [n for n in unique if n not in self._selectable]
        if refused:
            raise InteractiveSelectionError(
                f"{self.method or 'this delta method'} cannot modify {refused[:5]!r} (greyed out on the page); "
                f"unselect {'it' if len(refused) == 1 else 'them'}"
            )
        ordered = sorted(unique, key=self._order.__getitem__)
        if self._validate is not None:
            self._validate(ordered)
        return ordered

    def _finish(self, names: list[str] | None) -> None:
        if not self._done.is_set():
            self._result = names
            self._done.set()
