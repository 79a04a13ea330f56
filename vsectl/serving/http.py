"""The HTTP side of `vsectl serve`: a page, a JSON API and the collection's image files, on the standard library.

Routes (GET and HEAD only):

    /                          the search page (one self-contained HTML file: no scripts or styles from elsewhere)
    /api/search?q=TEXT&k=10    text → images (side=captions: text → captions)
    /api/similar?image=I&k=10  the collection's image I → images (or captions)
    /api/info                  sizes, run and fingerprint of the collection
    /image/I                   the file of image I

Files are addressed by their row in the collection, never by a path: a URL can only name an image the collection
lists, so nothing else on the disk is reachable, whatever the URL holds. The file is opened first and its real path
checked afterwards to lie under the collection's image folder, so a link swapped in after embedding cannot lead out.

Only requests whose Host header names the server (the bound address, and the loopback names when it listens on
loopback; `allow_hosts` adds names) are answered: a web page elsewhere cannot reach the server through DNS rebinding.

The standard library's threading server is enough here: a request's time is the scan of the embeddings (numpy,
which releases the GIL) and the text encoder, not the HTTP parsing; a framework would add dependencies, not speed.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import shutil
import socket
import socketserver
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from vsectl.errors import ConfigError, VsectlError
from vsectl.io import json_text
from vsectl.serving.engine import SearchEngine
from vsectl.serving.page import PAGE

log = logging.getLogger(__name__)

IMAGE_ROUTE = re.compile(r"/image/(\d{1,12})")
PAGE_POLICY = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self'; " \
              "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
FILE_POLICY = "default-src 'none'; style-src 'unsafe-inline'; sandbox"  # an SVG opened on its own runs no script
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")


class BadRequest(Exception):
    """A malformed parameter: answered with 400 and the message."""


def _int_param(params: dict[str, list[str]], name: str, default: int | None = None) -> int:
    values = params.get(name)
    if not values:
        if default is None:
            raise BadRequest(f"missing parameter {name}")
        return default
    try:
        return int(values[-1])
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {values[-1]!r}") from None


class Handler(BaseHTTPRequestHandler):
    """One request; the engine is the server's."""

    protocol_version = "HTTP/1.1"  # keep-alive: a client's requests reuse one connection
    disable_nagle_algorithm = True  # headers and body go out as written: no 40 ms wait for the client's delayed ACK
    timeout = 60                   # an idle connection is closed after a minute instead of holding its thread
    server_version = "vsectl"
    sys_version = ""
    server: VsectlServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, policy: str = PAGE_POLICY,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", policy)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json_text(obj, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8",
                   extra={"Cache-Control": "no-store"})

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def do_HEAD(self) -> None:  # noqa: N802 - the base class's naming
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        params = parse_qs(url.query, keep_blank_values=True)
        engine = self.server.engine
        host = host_name(self.headers.get("Host"))
        if host is not None and host not in self.server.allowed_hosts:
            log.warning("refused a request for host %r (allow it with --allow-host %s)", host[:100], host[:100])
            self._error(HTTPStatus.FORBIDDEN, f"this server does not answer for host {host[:100]!r}; start it with "
                                              f"--allow-host {host[:100]} to allow that name")
            return
        try:
            if url.path == "/":
                self._send(HTTPStatus.OK, PAGE.encode("utf-8"), "text/html; charset=utf-8")
            elif url.path == "/api/search":
                query = (params.get("q") or [""])[-1]
                side = (params.get("side") or ["images"])[-1]
                self._json(HTTPStatus.OK, engine.search_text(query, k=_int_param(params, "k", 10), side=side))
            elif url.path == "/api/similar":
                side = (params.get("side") or ["images"])[-1]
                self._json(HTTPStatus.OK, engine.search_image(_int_param(params, "image"),
                                                              k=_int_param(params, "k", 10), side=side))
            elif url.path == "/api/info":
                self._json(HTTPStatus.OK, engine.info())
            elif match := IMAGE_ROUTE.fullmatch(url.path):
                self._image(int(match.group(1)))
            elif url.path == "/favicon.ico":
                self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
            else:
                self._error(HTTPStatus.NOT_FOUND, "no such page")
        except (BadRequest, ConfigError) as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e))
        except LookupError as e:
            self._error(HTTPStatus.NOT_FOUND, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except VsectlError as e:  # a damaged collection: one line in the server's log, no path to the client
            log.error("request %s failed: %s", self.path[:200], e)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "the collection on this server is damaged (see its log)")
        except Exception:  # noqa: BLE001 - a bug in one request must not take the server down
            log.exception("request %s failed", self.path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the server's log)")

    def _image(self, image: int) -> None:
        opened = self.server.engine.open_image(image)
        if opened is None:
            self._error(HTTPStatus.NOT_FOUND, f"image {image} has no file to show")
            return
        f, kind = opened
        with f:
            size = f.seek(0, 2)
            f.seek(0)
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(size))
            self.send_header("Cache-Control", "max-age=3600")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", FILE_POLICY)
            self.end_headers()
            if self.command != "HEAD":
                shutil.copyfileobj(f, self.wfile)


class VsectlServer(ThreadingHTTPServer):
    """A threading HTTP server holding one `SearchEngine`."""

    daemon_threads = True  # an open keep-alive connection does not hold up shutdown

    def __init__(self, address: tuple[str, int], engine: SearchEngine | None,
                 allow_hosts: Iterable[str] = ()) -> None:
        self.engine = engine
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.allowed_hosts = served_names(address[0], allow_hosts)
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # HTTPServer's version adds a reverse DNS lookup of the host
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"


def host_name(header: str | None) -> str | None:
    """The host part of a Host header, lower-cased, without port, brackets or a final dot (None without a header)."""
    if header is None:
        return None
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def served_names(host: str, allow_hosts: Iterable[str] = ()) -> frozenset[str]:
    """The Host header names a server bound to `host` answers: `host` itself, the loopback names when it listens on
    loopback, this machine's names and addresses when it listens on every interface, and `allow_hosts`."""
    names = {host.lower().rstrip("."), *(h for h in (host_name(a) for a in allow_hosts) if h)}
    if is_loopback(host) or host in WILDCARD:
        names |= set(LOOPBACK)
    if host in WILDCARD:
        machine = {socket.gethostname(), socket.getfqdn()}
        names |= {n.lower() for n in machine}
        for name in machine:
            try:
                names |= {str(info[4][0]).lower() for info in socket.getaddrinfo(name, None)}
            except OSError:
                continue
    return frozenset(names)


def make_server(engine: SearchEngine | None, host: str = "127.0.0.1", port: int = 8000,
                allow_hosts: Iterable[str] = ()) -> VsectlServer:
    """Bind the server (port 0: any free port; see `.url`); set `.engine` before serving if None is given.

    Args:
        allow_hosts: more names the server answers to in the Host header (e.g. the name of a reverse proxy).

    Raises:
        ConfigError: the port is in use or cannot be bound.
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {port}")
    if not is_loopback(host):
        log.warning("serving on %s: other machines on that network can reach this collection", host)
    try:
        return VsectlServer((host, port), engine, allow_hosts)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is in use; choose another with --port (or --port 0 for any "
                              "free one)") from None
        if e.errno in (errno.EADDRNOTAVAIL, errno.EACCES, -2, -3, -5):
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); check --host and --port") from None
        raise
