"""Loopback-only guards for everything the test suite runs.

The root ``tests/conftest.py`` installs these guards for the whole pytest
session:

* the session environment is made safe (no real credentials, no config files,
  the instance metadata service off unless it points at loopback, AWS endpoint
  overrides loopback only);
* ``socket.socket.connect``/``connect_ex``/``sendto`` and the name resolvers
  refuse any internet address outside 127.0.0.0/8 and ::1 before a packet
  leaves (Unix sockets are not touched);
* ``subprocess.Popen`` refuses a child started with an explicit environment
  that could reach a real AWS endpoint or the real metadata service.

Every refusal raises :class:`SafetyViolation` *and* is recorded, so a test
that swallows the exception still fails (the root conftest checks the record
after each test). Tests that provoke a refusal on purpose take it back with
:func:`take_violations`.

Tests build child environments with :func:`loopback_env`.
"""

from __future__ import annotations

import atexit
import inspect
import ipaddress
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Mapping
from typing import Any, Callable
from urllib.parse import urlsplit

DUMMY_KEY = "testing"

# Variables that make botocore read credentials or endpoints from somewhere
# other than the environment the tests control. They are removed from the
# session environment.
_CREDENTIAL_SOURCES = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
)
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


class SafetyViolation(RuntimeError):
    """Something tried to leave loopback or to start an unsafe child."""


_violations: list[str] = []
_violations_lock = threading.Lock()


def _refuse(message: str) -> SafetyViolation:
    with _violations_lock:
        _violations.append(message)
    return SafetyViolation(message)


def take_violations() -> list[str]:
    """Return the refusals recorded so far and forget them."""
    with _violations_lock:
        taken = list(_violations)
        _violations.clear()
    return taken


# --- what counts as loopback -------------------------------------------------


def is_loopback_address(host: str) -> bool:
    """True for an IP literal in 127.0.0.0/8 or ::1 (also IPv4-mapped)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def is_loopback_host(host: str) -> bool:
    """True for a loopback IP literal or the name ``localhost``."""
    host = host.strip("[]").rstrip(".").lower()
    return host == "localhost" or is_loopback_address(host)


def is_loopback_url(url: str) -> bool:
    """True when ``url`` has a scheme and its host is loopback."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return False
    return bool(parts.scheme) and host is not None and is_loopback_host(host)


def env_problems(env: Mapping[str, str]) -> list[str]:
    """List the reasons why ``env`` is not safe for a child process."""
    problems: list[str] = []
    for key, value in sorted(env.items()):
        if key.startswith("AWS_ENDPOINT_URL") and not is_loopback_url(value):
            problems.append(f"{key}={value!r} is not a loopback URL")
    imds = env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT")
    disabled = env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true"
    if imds is not None and not is_loopback_url(imds):
        problems.append(f"AWS_EC2_METADATA_SERVICE_ENDPOINT={imds!r} is not a loopback URL")
    if imds is None and not disabled:
        problems.append(
            "neither AWS_EC2_METADATA_DISABLED=true nor a loopback "
            "AWS_EC2_METADATA_SERVICE_ENDPOINT is set: boto3 would ask the real metadata service"
        )
    full_uri = env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")
    if full_uri is not None and not is_loopback_url(full_uri):
        problems.append(f"AWS_CONTAINER_CREDENTIALS_FULL_URI={full_uri!r} is not a loopback URL")
    if "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI" in env:
        problems.append(
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI is set: it targets the real container endpoint"
        )
    return problems


# --- child environments ------------------------------------------------------

_home_lock = threading.Lock()
_home: list[str] = []


def empty_home() -> str:
    """An empty directory, made once per process and removed at exit."""
    with _home_lock:
        if not _home:
            path = tempfile.mkdtemp(prefix="ses-test-home-")
            atexit.register(shutil.rmtree, path, True)
            _home.append(path)
        return _home[0]


def loopback_env(
    moto_url: str | None = None,
    imds_url: str | None = None,
    *,
    home: str | os.PathLike[str] | None = None,
    region: str | None = "us-east-1",
    static_credentials: bool | None = None,
    **extra: str,
) -> dict[str, str]:
    """Build a complete, safe environment for a child process.

    The result holds an explicit ``PATH``, a ``HOME`` without AWS config
    (``home`` or a shared empty directory), config and credential files that do
    not exist, ``AWS_ENDPOINT_URL=moto_url`` when given, and either
    ``AWS_EC2_METADATA_SERVICE_ENDPOINT=imds_url`` or
    ``AWS_EC2_METADATA_DISABLED=true``. Dummy keys are set unless the child
    must take its credentials from the metadata service (``imds_url`` given,
    unless ``static_credentials`` says otherwise). ``extra`` adds or replaces
    variables; the result is checked and a :class:`ValueError` names any
    problem.
    """
    home_dir = os.fspath(home) if home is not None else empty_home()
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": home_dir,
        "LANG": "C.UTF-8",
        "AWS_CONFIG_FILE": os.path.join(home_dir, ".aws-config-absent"),
        "AWS_SHARED_CREDENTIALS_FILE": os.path.join(home_dir, ".aws-credentials-absent"),
        "NO_PROXY": ",".join(_LOOPBACK_NAMES),
    }
    if region is not None:
        env["AWS_DEFAULT_REGION"] = region
    if moto_url is not None:
        env["AWS_ENDPOINT_URL"] = moto_url
    if imds_url is not None:
        env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = imds_url
    else:
        env["AWS_EC2_METADATA_DISABLED"] = "true"
    if static_credentials is None:
        static_credentials = imds_url is None
    if static_credentials:
        env["AWS_ACCESS_KEY_ID"] = DUMMY_KEY
        env["AWS_SECRET_ACCESS_KEY"] = DUMMY_KEY
    env.update(extra)
    problems = env_problems(env)
    if problems:
        raise ValueError("unsafe child environment: " + "; ".join(problems))
    return env


# --- the session environment -------------------------------------------------


def make_session_env_safe(environ: dict[str, str] | os._Environ[str], scratch: str) -> None:
    """Force the session environment safe; raise SafetyViolation if it cannot be.

    ``scratch`` is a directory for the (absent) AWS config and credential files.
    """
    for key, value in environ.items():
        if key.startswith("AWS_ENDPOINT_URL") and not is_loopback_url(value):
            raise SafetyViolation(f"{key}={value!r} is not a loopback URL: refusing to run tests")
    imds = environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT")
    if imds is not None and not is_loopback_url(imds):
        raise SafetyViolation(
            f"AWS_EC2_METADATA_SERVICE_ENDPOINT={imds!r} is not a loopback URL: "
            "refusing to run tests"
        )
    if imds is None:
        environ["AWS_EC2_METADATA_DISABLED"] = "true"
    for key in (*_CREDENTIAL_SOURCES, *_PROXY_VARS):
        environ.pop(key, None)
    environ["AWS_ACCESS_KEY_ID"] = DUMMY_KEY
    environ["AWS_SECRET_ACCESS_KEY"] = DUMMY_KEY
    environ["AWS_CONFIG_FILE"] = os.path.join(scratch, "aws-config-absent")
    environ["AWS_SHARED_CREDENTIALS_FILE"] = os.path.join(scratch, "aws-credentials-absent")
    environ["NO_PROXY"] = environ["no_proxy"] = ",".join(_LOOPBACK_NAMES)


# --- socket and subprocess guards --------------------------------------------

_INET = (socket.AF_INET, socket.AF_INET6)


def _check_inet_target(family: int, address: Any, what: str) -> None:
    if family not in _INET:
        return
    host = address[0] if isinstance(address, tuple) and address else address
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host)
    if host.lower() == "localhost" or is_loopback_address(host):
        return
    port = address[1] if isinstance(address, tuple) and len(address) > 1 else "?"
    raise _refuse(f"safety guard: {what} to non-loopback address {host} port {port} refused")


def _check_name(host: Any, what: str) -> None:
    """Allow resolving IP literals, localhost and this machine's own name only."""
    if host is None:
        return
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    name = str(host).strip("[]").rstrip(".").lower()
    if name in ("", "localhost") or name.endswith(".localhost"):
        return
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        pass
    else:
        return
    if name == socket.gethostname().lower():
        return
    raise _refuse(f"safety guard: {what} of non-loopback name {name!r} refused")


class _Guards:
    def __init__(self) -> None:
        self.saved: list[tuple[object, str, object]] = []

    def patch(self, owner: object, name: str, value: object) -> None:
        self.saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def restore(self) -> None:
        while self.saved:
            owner, name, value = self.saved.pop()
            setattr(owner, name, value)


_installed: list[_Guards] = []


def install_guards() -> None:
    """Patch socket and subprocess for this process (idempotent)."""
    if _installed:
        return
    guards = _Guards()
    sock_cls = socket.socket
    real_connect = sock_cls.connect
    real_connect_ex = sock_cls.connect_ex
    real_sendto: Callable[..., int] = sock_cls.sendto
    real_getaddrinfo = socket.getaddrinfo
    real_gethostbyname = socket.gethostbyname
    real_gethostbyname_ex = socket.gethostbyname_ex
    real_gethostbyaddr = socket.gethostbyaddr

    def connect(self: socket.socket, address: Any) -> None:
        _check_inet_target(self.family, address, "connect")
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        _check_inet_target(self.family, address, "connect")
        return real_connect_ex(self, address)

    def sendto(self: socket.socket, data: Any, *args: Any) -> int:
        if args:
            _check_inet_target(self.family, args[-1], "sendto")
        return real_sendto(self, data, *args)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        _check_name(host, "name lookup")
        return real_getaddrinfo(host, *args, **kwargs)

    def gethostbyname(host: str) -> str:
        _check_name(host, "name lookup")
        return real_gethostbyname(host)

    def gethostbyname_ex(host: str) -> tuple[str, list[str], list[str]]:
        _check_name(host, "name lookup")
        return real_gethostbyname_ex(host)

    def gethostbyaddr(host: str) -> tuple[str, list[str], list[str]]:
        if not (is_loopback_host(host) or host.lower() == socket.gethostname().lower()):
            raise _refuse(f"safety guard: reverse lookup of non-loopback address {host!r} refused")
        return real_gethostbyaddr(host)

    guards.patch(sock_cls, "connect", connect)
    guards.patch(sock_cls, "connect_ex", connect_ex)
    guards.patch(sock_cls, "sendto", sendto)
    guards.patch(socket, "getaddrinfo", getaddrinfo)
    guards.patch(socket, "gethostbyname", gethostbyname)
    guards.patch(socket, "gethostbyname_ex", gethostbyname_ex)
    guards.patch(socket, "gethostbyaddr", gethostbyaddr)

    popen_cls = subprocess.Popen
    real_init = popen_cls.__init__
    signature = inspect.signature(real_init)

    def popen_init(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        env = bound.arguments.get("env")
        if env is not None:
            text_env = {
                (k.decode() if isinstance(k, bytes) else str(k)): (
                    v.decode() if isinstance(v, bytes) else str(v)
                )
                for k, v in env.items()
            }
            problems = env_problems(text_env)
            if problems:
                command = bound.arguments.get("args")
                raise _refuse(
                    f"safety guard: refusing to start {command!r} with an unsafe environment: "
                    + "; ".join(problems)
                    + " (build child environments with tests.safety.loopback_env)"
                )
        real_init(self, *args, **kwargs)

    guards.patch(popen_cls, "__init__", popen_init)
    _installed.append(guards)


def uninstall_guards() -> None:
    """Undo :func:`install_guards`."""
    while _installed:
        _installed.pop().restore()
