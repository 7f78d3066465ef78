"""Helpers for the mail program's tests: moto in-process, a faulting SES endpoint,
a tiny IMDSv2 fake, and a runner that starts the program as a subprocess."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
from moto.backends import get_backend

from tests.safety import DUMMY_KEY, loopback_env

REPO = Path(__file__).resolve().parents[2]
MAILER = REPO / "files" / "ses_mailer.py"
ACCOUNT = "123456789012"  # moto's default account
REGION = "us-east-1"
SENDER = "ops@example.com"


# The interpreter that runs the program: the venv's by default. To check the
# program against a distribution's python3-boto3 (Debian 12 ships botocore 1.29),
# set SES_MAILER_TEST_PYTHON=/usr/bin/python3 and, for an unpacked package tree,
# SES_MAILER_TEST_PYTHONPATH=<dir>/usr/lib/python3/dist-packages.
PYTHON = os.environ.get("SES_MAILER_TEST_PYTHON", sys.executable)
PYTHONPATH = os.environ.get("SES_MAILER_TEST_PYTHONPATH", "")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def closed_url() -> str:
    """A loopback URL nothing listens on: any connection attempt fails at once."""
    return f"http://127.0.0.1:{free_port()}"


# --- running the program -------------------------------------------------------


@dataclass
class Result:
    code: int
    stdout: bytes
    stderr: str
    seconds: float

    @property
    def lines(self) -> list[str]:
        return self.stderr.splitlines()


def write_job(directory: Path, job: dict[str, Any], name: str = "job.json") -> Path:
    path = directory / name
    path.write_text(json.dumps(job, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def mailer_env(
    endpoint: str | None,
    home: Path,
    *,
    region: str | None = REGION,
    imds_url: str | None = None,
    static_credentials: bool | None = None,
    **extra: str,
) -> dict[str, str]:
    """A loopback-only child environment (tests/safety.py checks it)."""
    if PYTHONPATH:
        extra.setdefault("PYTHONPATH", PYTHONPATH)
    return loopback_env(
        endpoint,
        imds_url,
        home=home,
        region=region,
        static_credentials=static_credentials,
        **extra,
    )


def run_mailer(
    job: Path,
    *args: str,
    env: dict[str, str],
    timeout: float = 60,
    stderr_file: Path | None = None,
) -> Result:
    """Run files/ses_mailer.py as operators do: a subprocess with its own environment."""
    command = [PYTHON, str(MAILER), "--job", str(job), *args]
    started = time.monotonic()
    if stderr_file is None:
        proc = subprocess.run(command, env=env, capture_output=True, timeout=timeout, check=False)
        stderr = proc.stderr.decode()
    else:
        with stderr_file.open("wb") as err:
            proc = subprocess.run(
                command, env=env, stdout=subprocess.PIPE, stderr=err, timeout=timeout, check=False
            )
        stderr = stderr_file.read_text()
    return Result(proc.returncode, proc.stdout, stderr, time.monotonic() - started)


def start_mailer(job: Path, *args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PYTHON, str(MAILER), "--job", str(job), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


# --- moto ------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One raw message moto accepted."""

    source: str
    destinations: frozenset[str]
    raw: str

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_string(self.raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    def header(self, name: str) -> str:
        """The header's raw (encoded) value as sent, unfolded."""
        for line_name, value in _raw_headers(self.raw):
            if line_name.lower() == name.lower():
                return value
        raise KeyError(name)

    def text(self) -> str:
        part = self.message.get_body(preferencelist=("plain",))
        assert part is not None
        content: str = part.get_content()
        return content.replace("\r\n", "\n")  # CRLF on the wire, as SMTP wants


def _raw_headers(raw: str) -> list[tuple[str, str]]:
    head = raw.replace("\r\n", "\n").split("\n\n", 1)[0]
    unfolded = head.replace("\n ", " ").replace("\n\t", " ")
    pairs = []
    for line in unfolded.split("\n"):
        name, _, value = line.partition(":")
        pairs.append((name, value.strip()))
    return pairs


class Moto:
    """The in-process moto server: identities in, sent mail out."""

    def __init__(self, url: str) -> None:
        self.url = url

    def reset(self) -> None:
        url = f"{self.url}/moto-api/reset"  # loopback moto
        request = urllib.request.Request(url, method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            assert response.status == 200

    def client(self, service: str, region: str = REGION) -> Any:
        return boto3.client(  # type: ignore[call-overload]
            service,
            endpoint_url=self.url,
            region_name=region,
            aws_access_key_id=DUMMY_KEY,
            aws_secret_access_key=DUMMY_KEY,
        )

    def verify(self, identity: str = SENDER, region: str = REGION) -> None:
        self.client("ses", region).verify_email_identity(EmailAddress=identity)

    def sent(self, region: str = REGION) -> list[Sent]:
        backend = get_backend("ses")[ACCOUNT][region]
        return [
            Sent(m.source, frozenset(m.destinations), m.raw_data)
            for m in backend.sent_messages
            if hasattr(m, "raw_data")
        ]

    def sent_anywhere(self) -> int:
        backends = get_backend("ses")[ACCOUNT]
        return sum(len(backends[region].sent_messages) for region in list(backends.keys()))


def envelope(sent: Sent) -> set[str]:
    """moto adds the header recipients to the envelope: strip display names."""
    addresses = set()
    for item in sent.destinations:
        addresses.add(email.utils.parseaddr(item)[1].lower())
    return addresses


# --- a faulting SES v2 endpoint ------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    error: str | None = None
    message: str = ""
    hang: bool = False
    delay: float = 0.0  # seconds before answering
    xml: str | None = None  # a raw XML error body, as moto's IAM enforcement sends for SES v2


@dataclass
class Request:
    at: float
    path: str
    body: dict[str, Any]

    @property
    def to(self) -> list[str]:
        destination = self.body.get("Destination", {})
        found: list[str] = destination.get("ToAddresses", [])
        return found

    @property
    def raw(self) -> bytes:
        return base64.b64decode(self.body["Content"]["Raw"]["Data"])


@dataclass
class FaultState:
    script: list[Reply] = field(default_factory=list)
    default: Reply = field(default_factory=Reply)
    requests: list[Request] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0
    max_in_flight: int = 0


class FaultServer(ThreadingHTTPServer):
    """Answers SES v2 SendEmail from a script of replies; counts every request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FaultHandler)
        self.state = FaultState()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> FaultServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.state.release.set()
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=10)

    def then(self, *replies: Reply, default: Reply | None = None) -> None:
        with self.state.lock:
            self.state.script.extend(replies)
            if default is not None:
                self.state.default = default

    @property
    def requests(self) -> list[Request]:
        with self.state.lock:
            return list(self.state.requests)


class _FaultHandler(BaseHTTPRequestHandler):
    server: FaultServer

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        state = self.server.state
        with state.lock:
            state.requests.append(Request(time.monotonic(), self.path, body))
            count = len(state.requests)
            reply = state.script.pop(0) if state.script else state.default
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            self._answer(reply, count)
        finally:
            with state.lock:
                state.in_flight -= 1

    def _answer(self, reply: Reply, count: int) -> None:
        state = self.server.state
        if reply.delay:
            time.sleep(reply.delay)
        if reply.hang:
            state.release.wait(60)
            return
        if reply.xml is not None:
            payload = reply.xml.encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "text/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if reply.error is None:
            payload = json.dumps({"MessageId": f"fault-{count:04d}"}).encode()
            self.send_response(200)
        else:
            payload = json.dumps({"__type": reply.error, "message": reply.message}).encode()
            self.send_response(reply.status)
            self.send_header("x-amzn-ErrorType", reply.error)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


# --- a minimal IMDSv2 -------------------------------------------------------------


class TinyImds(ThreadingHTTPServer):
    """Token flow and two leaves: placement/region and instance-id. No credentials."""

    daemon_threads = True

    def __init__(self, region: str, instance_id: str = "i-0123456789abcdef0") -> None:
        super().__init__(("127.0.0.1", 0), _ImdsHandler)
        self.region = region
        self.instance_id = instance_id
        self.tokens: set[str] = set()
        self.log: list[str] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def start(self) -> TinyImds:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=10)


class _ImdsHandler(BaseHTTPRequestHandler):
    server: TinyImds

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _reply(self, status: int, text: str = "") -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        self.server.log.append(f"PUT {self.path}")
        if self.path != "/latest/api/token" or not self.headers.get(
            "X-aws-ec2-metadata-token-ttl-seconds"
        ):
            self._reply(400)
            return
        token = f"token-{len(self.server.tokens)}"
        self.server.tokens.add(token)
        self._reply(200, token)

    def do_GET(self) -> None:
        self.server.log.append(f"GET {self.path}")
        if self.headers.get("X-aws-ec2-metadata-token") not in self.server.tokens:
            self._reply(401)
            return
        leaves = {
            "/latest/meta-data/placement/region": self.server.region,
            "/latest/meta-data/instance-id": self.server.instance_id,
        }
        if self.path in leaves:
            self._reply(200, leaves[self.path])
        else:
            self._reply(404)


def stderr_identity(path: Path) -> str:
    """``JOURNAL_STREAM``'s value for a child whose stderr is ``path``."""
    info = os.stat(path)
    return f"{info.st_dev}:{info.st_ino}"
