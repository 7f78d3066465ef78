"""Loopback HTTP proxy in front of moto that records AWS API calls and injects faults.

moto accepts IAM deletions in orders AWS refuses and never answers with IAM's
propagation errors. Tests put this proxy between the playbooks and moto to

* record every call (service, action) in order, to assert the teardown order
  and that an unchanged run makes no Create*/Update*/Put* call;
* answer chosen actions with an error a given number of times (or forever),
  for example EC2's "Invalid IAM Instance Profile name".

Both ends must be loopback. Use it in-process (``AwsProxy``) or as a command:

    python lab/awsproxy.py --listen 127.0.0.1:24390 --upstream http://127.0.0.1:24300

Control endpoints on the proxy itself (JSON):
    GET    /_proxy/calls    the recorded calls
    DELETE /_proxy/calls    forget them
    PUT    /_proxy/faults   replace the fault rules (a list of rule objects)
    DELETE /_proxy/faults   remove all rules
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import signal
import sys
import threading
import uuid
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, urlsplit

CONTROL_PREFIX = "/_proxy/"
# Hop-by-hop headers are not forwarded.
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class Call:
    """One recorded API call."""

    service: str
    action: str
    method: str
    path: str
    status: int
    injected: bool
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class Fault:
    """Answer ``action`` (of ``service`` when given) with an error.

    ``times`` is how many matching calls get the error; ``None`` means always.
    ``body`` defaults to an EC2/IAM style XML error document.
    """

    action: str
    code: str
    message: str
    status: int = 400
    times: int | None = 1
    service: str | None = None
    body: str | None = None

    def render(self) -> bytes:
        if self.body is not None:
            return self.body.encode()
        request_id = uuid.uuid4()
        if self.service not in (None, "ec2"):
            return (
                '<ErrorResponse><Error><Type>Sender</Type>'
                f"<Code>{self.code}</Code><Message>{self.message}</Message></Error>"
                f"<RequestId>{request_id}</RequestId></ErrorResponse>"
            ).encode()
        return (
            f"<Response><Errors><Error><Code>{self.code}</Code>"
            f"<Message>{self.message}</Message></Error></Errors>"
            f"<RequestID>{request_id}</RequestID></Response>"
        ).encode()


def _service_of(headers: Any) -> str:
    """The signing service from the SigV4 Authorization header ("" if unsigned)."""
    auth = str(headers.get("Authorization", ""))
    marker = "Credential="
    if marker not in auth:
        return ""
    scope = auth.split(marker, 1)[1].split(",", 1)[0].split("/")
    return scope[3] if len(scope) > 3 else ""


def _action_of(method: str, path: str, headers: Any, body: bytes) -> tuple[str, dict[str, str]]:
    """The API action: query "Action", JSON target, or "METHOD /path" for REST APIs."""
    target = headers.get("X-Amz-Target")
    if target:
        return str(target).rsplit(".", 1)[-1], {}
    ctype = str(headers.get("Content-Type", ""))
    if "x-www-form-urlencoded" in ctype or not ctype:
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        query = {k: v[0] for k, v in parse_qs(urlsplit(path).query).items()}
        form = {**query, **form}
        if "Action" in form:
            return form["Action"], form
    return f"{method} {urlsplit(path).path}", {}


class AwsProxy:
    """The proxy server; ``start()`` runs it in a daemon thread."""

    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not _is_loopback(parts.hostname):
            raise ValueError(f"upstream must be an http URL on loopback, got {upstream!r}")
        if not _is_loopback(host):
            raise ValueError(f"the proxy listens on loopback only, got {host!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.calls: list[Call] = []
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer((host, port), self._handler_class())
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> AwsProxy:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset(self) -> None:
        with self.lock:
            self.calls.clear()
            self.faults.clear()

    def take_calls(self) -> list[Call]:
        with self.lock:
            taken = list(self.calls)
            self.calls.clear()
        return taken

    def set_faults(self, faults: list[Fault]) -> None:
        with self.lock:
            self.faults = list(faults)

    def _match_fault(self, service: str, action: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.action != action or (fault.service and fault.service != service):
                    continue
                if fault.times is not None:
                    if fault.times <= 0:
                        continue
                    fault.times -= 1
                return fault
        return None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reply(self, status: int, body: bytes, ctype: str = "text/xml") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _control(self, body: bytes) -> None:
                name = self.path[len(CONTROL_PREFIX) :]
                if name == "calls" and self.command == "GET":
                    with proxy.lock:
                        data = [asdict(c) for c in proxy.calls]
                    self._reply(200, json.dumps(data).encode(), "application/json")
                elif name == "calls" and self.command == "DELETE":
                    proxy.take_calls()
                    self._reply(204, b"")
                elif name == "faults" and self.command == "PUT":
                    proxy.set_faults([Fault(**f) for f in json.loads(body or b"[]")])
                    self._reply(204, b"")
                elif name == "faults" and self.command == "DELETE":
                    proxy.set_faults([])
                    self._reply(204, b"")
                else:
                    self._reply(404, b"unknown control path", "text/plain")

            def _forward(self) -> None:
                body = self._body()
                if self.path.startswith(CONTROL_PREFIX):
                    self._control(body)
                    return
                service = _service_of(self.headers)
                action, params = _action_of(self.command, self.path, self.headers, body)
                fault = proxy._match_fault(service, action)
                if fault is not None:
                    self._reply(fault.status, fault.render())
                    status, injected = fault.status, True
                else:
                    status, injected = self._pass_on(body), False
                with proxy.lock:
                    proxy.calls.append(
                        Call(service, action, self.command, self.path, status, injected, params)
                    )

            def _pass_on(self, body: bytes) -> int:
                conn = http.client.HTTPConnection(
                    proxy.upstream_host, proxy.upstream_port, timeout=60
                )
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS
                }
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                    self.send_response(answer.status, answer.reason)
                    for key, value in answer.getheaders():
                        if key.lower() not in _HOP_HEADERS and key.lower() != "content-length":
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return answer.status
                finally:
                    conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _forward

        return Handler


def main(argv: list[str] | None = None) -> int:
    """Run the proxy until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="loopback host:port to listen on")
    parser.add_argument("--upstream", required=True, help="moto URL on loopback")
    parser.add_argument("--pidfile", help="write the pid here once listening")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    try:
        proxy = AwsProxy(args.upstream, host or "127.0.0.1", int(port))
    except (ValueError, OSError) as error:
        print(f"awsproxy: {error}", file=sys.stderr)
        return 64
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    proxy.start()
    if args.pidfile:
        with open(args.pidfile, "w", encoding="ascii") as handle:
            handle.write(f"{os.getpid()}\n")
    print(f"awsproxy: {proxy.url} -> {args.upstream}", file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        pass
    proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
