"""Stores on 127.0.0.1 for tests and benchmarks: a folder over HTTP, an S3 API, and a proxy.

Object stores are where terabyte volumes live, and what they do to a run (many requests, whole
chunks, throttling, dropped connections) is the engine's business; these stand-ins let the
tests and ``benchmarks/read_amplification.py`` see it on one machine:

- :class:`FolderServer`: a local folder over plain HTTP (GET and HEAD, byte ranges including
  the suffix ranges a Zarr v3 shard index is read with), counting requests and bytes sent; it
  can hold chosen reads unanswered until released, so a test can stop a run part-way by
  construction rather than by racing it.
- :class:`S3Server`: moto's S3 API server, in threads of this process (``moto[server]``).
  moto speaks the S3 protocol over HTTP as s3fs does; it is a stand-in, not a production store.
- :class:`CountingProxy`: forwards every request to one of them, counting what it returns, and
  fails a chosen share of requests on purpose (HTTP 503 SlowDown, a dropped connection, a
  short body), as a throttled or flaky store does.

Counts are kept per request path, so a caller can tell chunk reads from metadata.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import random
import re
import socket
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
FAULTS = ("slowdown", "drop", "short")
"""What :class:`CountingProxy` does to a failed request: answer HTTP 503 SlowDown (throttling),
close the connection unanswered, or send a body shorter than its Content-Length."""


@dataclass
class Traffic:
    """Requests and response body bytes, per method and path; thread-safe."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    sent: Counter[tuple[str, str]] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, method: str, path: str, sent: int) -> None:
        with self._lock:
            self.requests[method, path] += 1
            self.sent[method, path] += sent

    def fault(self, kind: str) -> None:
        with self._lock:
            self.faults[kind] += 1

    def total(
        self, *, method: str = "GET", under: str = "", chunks: bool = False
    ) -> tuple[int, int]:
        """Requests and bytes sent for ``method`` on paths starting with ``under``; with
        ``chunks``, only the chunk and shard keys of Zarr v3 (``.../c/...``)."""
        with self._lock:
            keys = [
                key
                for key in self.requests
                if key[0] == method and key[1].startswith(under) and (not chunks or "/c/" in key[1])
            ]
            return sum(self.requests[k] for k in keys), sum(self.sent[k] for k in keys)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.sent.clear()
            self.faults.clear()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-answer (as aiohttp does on a refusal, or a dropped
        connection injected on purpose) is the client's business: said nowhere. Anything else
        is printed, as the standard server does."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Server:
    """A threading HTTP server on 127.0.0.1, run in a daemon thread until :meth:`close`."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.traffic = Traffic()
        self._httpd = _HTTPServer(("127.0.0.1", 0), handler)
        self._httpd.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class _Quiet:
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _FolderHandler(_Quiet, SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as object stores

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        server = args[2]  # (request, client address, server)
        super().__init__(*args, directory=str(server.owner.folder), **kwargs)

    def send_head(self) -> Any:
        self._range: tuple[int, int] | None = None
        owner = self.server.owner  # type: ignore[attr-defined]
        if self.command == "GET" and owner.hold(self.path):
            owner.released.wait()
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404, "Not Found")
            return None
        size = path.stat().st_size
        start, stop = 0, size
        wanted = RANGE.match(self.headers.get("Range", "").strip())
        if wanted:
            first, last = wanted.groups()
            if first:
                start, stop = int(first), min(size, int(last) + 1 if last else size)
            elif last:
                start = max(0, size - int(last))
            self._range = start, stop
        handle = path.open("rb")
        self.send_response(206 if wanted else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(stop - start))
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        handle.seek(start)
        self._length = stop - start
        return handle

    def copyfile(self, source: Any, outputfile: Any) -> None:
        body = source.read(self._length)
        outputfile.write(body)
        self.server.owner.traffic.add(self.command, self.path, len(body))  # type: ignore[attr-defined]

    def do_HEAD(self) -> None:
        handle = self.send_head()
        if handle is not None:
            handle.close()
        self.server.owner.traffic.add("HEAD", self.path, 0)  # type: ignore[attr-defined]


class FolderServer(_Server):
    """``folder`` over HTTP at :attr:`url` (read only), counting what it sends.

    A GET of a path that ``hold`` selects waits, unanswered, until :meth:`release` (or
    :meth:`close`): the reads of a run that need those bytes cannot finish before then,
    whatever the machine's speed.
    """

    def __init__(self, folder: str | Path, hold: Callable[[str], bool] | None = None) -> None:
        self.folder = Path(folder)
        self.hold: Callable[[str], bool] = hold or (lambda _: False)
        self.released = threading.Event()
        super().__init__(_FolderHandler)

    def release(self) -> None:
        """Answer the held reads, and every read from now on."""
        self.released.set()

    def close(self) -> None:
        self.release()
        super().close()


class _ProxyHandler(_Quiet, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _forward(self) -> None:
        proxy: CountingProxy = self.server.owner  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        fault = proxy.draw_fault(self.command, self.path)
        if proxy.forbid is not None and proxy.forbid.search(self.path):
            proxy.traffic.fault("forbidden")
            self._error(403, "Forbidden", b"AccessDenied", b"Access Denied")
            return
        if fault == "slowdown":
            proxy.traffic.fault(fault)
            self._slowdown()
            return
        if fault == "drop":
            proxy.traffic.fault(fault)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        headers["Host"] = f"{proxy.upstream_host}:{proxy.upstream_port}"
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        upstream.close()
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault == "short" and len(data) > 1:
            proxy.traffic.fault(fault)
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if self.command != "HEAD":
            self.wfile.write(data)
        proxy.traffic.add(self.command, self.path.split("?")[0], len(data))

    def _slowdown(self) -> None:
        self._error(503, "Slow Down", b"SlowDown", b"Please reduce your request rate.")

    def _error(self, status: int, reason: str, code: bytes, message: bytes) -> None:
        """An S3 error response, as XML."""
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>' + code + b"</Code>"
            b"<Message>" + message + b"</Message></Error>"
        )
        self.send_response(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


class CountingProxy(_Server):
    """A proxy at :attr:`url` to the HTTP server at ``upstream``, counting what it returns.

    ``fail`` is the share of requests (0 to 1) that fail on purpose, each with one of
    ``faults`` drawn from a generator seeded with ``seed`` (:data:`FAULTS`); only requests whose
    path matches ``only`` (a regular expression; default: Zarr chunk and shard keys) fail.
    Requests whose path matches ``forbid`` are answered 403 AccessDenied, every time.
    """

    def __init__(
        self,
        upstream: str,
        *,
        fail: float = 0.0,
        faults: tuple[str, ...] = FAULTS,
        seed: int = 0,
        only: str = r"/c/",
        forbid: str | None = None,
    ) -> None:
        host, _, port = upstream.removeprefix("http://").rstrip("/").partition(":")
        self.upstream_host, self.upstream_port = host, int(port or 80)
        self.fail, self.faults, self.only = fail, faults, re.compile(only)
        self.forbid = re.compile(forbid) if forbid is not None else None
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        super().__init__(_ProxyHandler)

    def draw_fault(self, method: str, path: str) -> str | None:
        if not self.fail or not self.only.search(path):
            return None
        with self._lock:
            if self._random.random() >= self.fail:
                return None
            kind = self._random.choice(self.faults)
        return "slowdown" if kind == "short" and method != "GET" else kind


class S3Server:
    """moto's S3 API on 127.0.0.1 at :attr:`url`, in threads of this process, until
    :meth:`close` (``pip install 'moto[server]'``)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"

    def close(self) -> None:
        self._server.stop()

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@contextlib.contextmanager
def s3_environment(endpoint: str, secret: str = "stand-in-secret") -> Iterator[dict[str, str]]:
    """Point s3fs (here and in worker processes started inside) at ``endpoint``, with stand-in
    credentials; the environment as it was afterwards."""
    settings = {
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "stand-in-key",
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    before = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield settings
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
