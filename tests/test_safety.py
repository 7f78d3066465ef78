"""The loopback-only guards fire, and no tracked file names a non-loopback endpoint.

Runtime: the root conftest installs the guards of ``tests/safety.py``; these
tests provoke each one and take the recorded refusal back, so the session
itself stays clean.

Static: every file git knows (tracked, or new and not ignored) except ``*.md``
is scanned. Rules, each reported as ``path:line: reason``:

* a URL whose host is literal and not in 127.0.0.0/8 (a bare ``127.``
  prefix counts as loopback), ``::1`` or ``localhost``. There is no
  exception for documentation links: they belong in ``*.md`` files. Hosts
  that are placeholders (``{...}``, ``$VAR``, ``%s``, ``<name>``) or built
  from parts are left to the runtime guards;
* an IPv4 literal outside 127.0.0.0/8 (the unspecified address included);
* an endpoint setting (``endpoint_url``, ``AWS_ENDPOINT_URL*``,
  ``AWS_EC2_METADATA_SERVICE_ENDPOINT``, ``ses_aws_endpoint_url``,
  ``moto_url``/``--moto-url``, ``imds_url``, ``ansible_host``, ``--host``,
  ``--endpoint-url``) whose literal value names a non-loopback host, with or
  without a scheme;
* the real instance metadata address (IPv4 and IPv6), written literally;
* anything shaped like an AWS access key id (``AKIA``/``ASIA`` and 16
  uppercase letters or digits), except an obvious placeholder whose 16
  characters are all the same.

Tests that need a refused value build it from parts at run time, as below.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests import safety

REPO = Path(__file__).resolve().parent.parent
TEST_NET_1 = ".".join(("192", "0", "2", "1"))  # RFC 5737 documentation address
TEST_NET_6 = ":".join(("2001", "db8", "", "1"))  # RFC 3849 documentation address
METADATA_V4 = ".".join(("169", "254", "169", "254"))
METADATA_V6 = ":".join(("fd00", "ec2", "", "254"))
FAR_URL = "https" + "://" + ".".join(("email", "us-east-1", "amazonaws", "com"))


# --- runtime: sockets --------------------------------------------------------


def _refused(expected: str) -> None:
    """The guard recorded exactly one refusal naming ``expected``; take it back."""
    taken = safety.take_violations()
    assert len(taken) == 1, taken
    assert expected in taken[0]


def test_connect_outside_loopback_is_refused_before_any_packet() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        with pytest.raises(safety.SafetyViolation, match=re.escape(f"{TEST_NET_1} port 9")):
            sock.connect((TEST_NET_1, 9))
        with pytest.raises(OSError) as not_connected:
            sock.getpeername()
        assert not_connected.value.errno == errno.ENOTCONN
    _refused(TEST_NET_1)


def test_connect_ex_and_create_connection_are_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        with pytest.raises(safety.SafetyViolation):
            sock.connect_ex((TEST_NET_1, 9))
    _refused(TEST_NET_1)
    with pytest.raises(safety.SafetyViolation, match=re.escape(TEST_NET_1)):
        socket.create_connection((TEST_NET_1, 9), timeout=1)
    _refused(TEST_NET_1)


@pytest.mark.parametrize(
    ("family", "address", "named"),
    [
        (socket.AF_INET6, (TEST_NET_6, 9, 0, 0), TEST_NET_6),
        (socket.AF_INET6, ("::ffff:" + TEST_NET_1, 9, 0, 0), TEST_NET_1),
        (socket.AF_INET, (METADATA_V4, 80), METADATA_V4),
        (socket.AF_INET, (".".join("0" * 4), 9), ".".join("0" * 4)),
    ],
)
def test_other_non_loopback_targets_are_refused(
    family: socket.AddressFamily, address: tuple[object, ...], named: str
) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        with pytest.raises(safety.SafetyViolation):
            sock.connect(address)
    _refused(named)


def test_udp_sendto_outside_loopback_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with pytest.raises(safety.SafetyViolation):
            sock.sendto(b"x", (TEST_NET_1, 9))
    _refused(TEST_NET_1)


def test_name_lookup_of_a_remote_name_is_refused() -> None:
    name = ".".join(("example", "com"))
    with pytest.raises(safety.SafetyViolation, match=re.escape(name)):
        socket.getaddrinfo(name, 443)
    _refused(name)
    with pytest.raises(safety.SafetyViolation):
        socket.create_connection((name, 443), timeout=1)
    _refused(name)


def test_loopback_and_unix_sockets_still_work(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            peer, _ = server.accept()
            with peer:
                client.sendall(b"ping")
                assert peer.recv(4) == b"ping"
        with socket.create_connection(("localhost", port), timeout=5):
            server.accept()[0].close()
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
    assert safety.take_violations() == []


def test_a_swallowed_refusal_still_fails_the_test(tmp_path: Path) -> None:
    """Run a small pytest session under the same conftest: it must fail."""
    inner = tmp_path / "test_inner.py"
    inner.write_text(
        "import socket\n"
        "def test_swallows() -> None:\n"
        "    try:\n"
        f"        socket.create_connection(({TEST_NET_1!r}, 9), timeout=1)\n"
        "    except Exception:\n"
        "        pass\n",
        encoding="utf-8",
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            str(inner),
        ],
        cwd=tmp_path,
        env=safety.loopback_env(home=tmp_path, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "safety guard refused during this test" in done.stdout
    assert f"non-loopback address {TEST_NET_1} port 9 refused" in done.stdout
    assert "1 failed" in done.stdout


# --- runtime: environment and subprocesses -----------------------------------


def test_session_environment_is_safe() -> None:
    env = os.environ
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("testing", "testing")
    assert not Path(env["AWS_CONFIG_FILE"]).exists()
    assert not Path(env["AWS_SHARED_CREDENTIALS_FILE"]).exists()
    assert "AWS_PROFILE" not in env and "AWS_SESSION_TOKEN" not in env
    assert safety.env_problems(dict(env)) == []


def test_session_environment_is_forced_safe(tmp_path: Path) -> None:
    environ = {
        "AWS_ACCESS_KEY_ID": "AKIA" + "A1B2C3D4E5F6G7H8",
        "AWS_SECRET_ACCESS_KEY": "real-looking",
        "AWS_SESSION_TOKEN": "token",
        "AWS_PROFILE": "prod",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials",
        "AWS_EC2_METADATA_DISABLED": "false",
        "HTTPS_PROXY": "http://127.0.0.1:3128",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:5000",
    }
    safety.make_session_env_safe(environ, str(tmp_path))
    assert environ["AWS_ACCESS_KEY_ID"] == environ["AWS_SECRET_ACCESS_KEY"] == "testing"
    assert environ["AWS_EC2_METADATA_DISABLED"] == "true"
    assert environ["AWS_CONFIG_FILE"].startswith(str(tmp_path))
    for gone in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        assert gone not in environ
    assert "HTTPS_PROXY" not in environ
    assert environ["AWS_ENDPOINT_URL"] == "http://127.0.0.1:5000"


def test_session_environment_keeps_a_loopback_metadata_endpoint(tmp_path: Path) -> None:
    environ = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:24151/"}
    safety.make_session_env_safe(environ, str(tmp_path))
    assert "AWS_EC2_METADATA_DISABLED" not in environ


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AWS_ENDPOINT_URL", FAR_URL),
        ("AWS_ENDPOINT_URL_SES", FAR_URL),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://{METADATA_V4}/"),
    ],
)
def test_session_refuses_to_start_with_a_non_loopback_endpoint(
    tmp_path: Path, variable: str, value: str
) -> None:
    with pytest.raises(safety.SafetyViolation, match=variable):
        safety.make_session_env_safe({variable: value}, str(tmp_path))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"AWS_EC2_METADATA_DISABLED": None}, "neither AWS_EC2_METADATA_DISABLED=true"),
        ({"AWS_EC2_METADATA_DISABLED": "false"}, "neither AWS_EC2_METADATA_DISABLED=true"),
        ({"AWS_ENDPOINT_URL": FAR_URL}, "AWS_ENDPOINT_URL="),
        ({"AWS_ENDPOINT_URL_SESV2": FAR_URL}, "AWS_ENDPOINT_URL_SESV2="),
        ({"AWS_ENDPOINT_URL": "127.0.0.1:5000"}, "AWS_ENDPOINT_URL="),
        (
            {"AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{METADATA_V4}/"},
            "AWS_EC2_METADATA_SERVICE_ENDPOINT=",
        ),
        ({"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/creds"}, "RELATIVE_URI"),
    ],
)
def test_popen_with_an_unsafe_env_is_refused(
    tmp_path: Path, changes: dict[str, str | None], reason: str
) -> None:
    env = safety.loopback_env(moto_url="http://127.0.0.1:9", home=tmp_path)
    for key, value in changes.items():
        if value is None:
            env.pop(key)
        else:
            env[key] = value
    marker = tmp_path / "child-ran"
    with pytest.raises(safety.SafetyViolation, match=re.escape(reason)):
        subprocess.run(["/bin/sh", "-c", f"touch {marker}"], env=env, check=False)
    assert not marker.exists()
    _refused(reason)


def test_popen_with_a_loopback_env_or_inherited_env_runs(tmp_path: Path) -> None:
    marker = tmp_path / "child-ran"
    env = safety.loopback_env(moto_url="http://127.0.0.1:9", imds_url="http://127.0.0.1:8/")
    subprocess.run(["/bin/sh", "-c", f"touch {marker}"], env=env, check=True)
    assert marker.exists()
    inherited = subprocess.run(
        ["/bin/sh", "-c", "echo $AWS_EC2_METADATA_DISABLED"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert inherited.stdout.strip() == "true"


def test_loopback_env_contents_and_refusals(tmp_path: Path) -> None:
    env = safety.loopback_env("http://127.0.0.1:24100", home=tmp_path)
    assert env["HOME"] == str(tmp_path)
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:24100"
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("testing", "testing")
    assert not Path(env["AWS_CONFIG_FILE"]).exists()
    from_imds = safety.loopback_env(imds_url="http://127.0.0.1:24151/", home=tmp_path)
    assert "AWS_ACCESS_KEY_ID" not in from_imds
    assert "AWS_EC2_METADATA_DISABLED" not in from_imds
    with pytest.raises(ValueError, match="AWS_ENDPOINT_URL"):
        safety.loopback_env(FAR_URL, home=tmp_path)
    with pytest.raises(ValueError, match="AWS_EC2_METADATA_SERVICE_ENDPOINT"):
        safety.loopback_env(imds_url=f"http://{METADATA_V4}/", home=tmp_path)


# --- static scan -------------------------------------------------------------

_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*)://([^\s/?#\"'`<>|\\)\]}]*(?:\][^\s/?#\"'`<>]*)?)")
_IPV4 = re.compile(r"(?<![\w.])(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?![\w]|\.\d)")
_ENDPOINT_KEYS = (
    r"endpoint[_-]?url",
    r"aws_endpoint_url\w*",
    r"aws_ec2_metadata_service_endpoint",
    r"moto[_-]?url",
    r"imds[_-]?url",
    r"ansible_host",
    r"--host",
    r"--endpoint-url",
)
_ENDPOINT = re.compile(
    r"(?i)(?<!\w)(" + "|".join(_ENDPOINT_KEYS) + r")"
    r"[\"']?\s*(?:=|:(?!//)|\s)\s*([\"']?)([^\s\"',;()}\]]+)"
)
_KEY_ID = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)([A-Z0-9]{16})(?![A-Z0-9])")
_PLACEHOLDER_START = ("{", "$", "%", "<", "(", "[")
_CODE_SUFFIXES = (".py", ".pyi")


def _host_is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if re.fullmatch(r"127(\.\d{0,3}){1,3}", host):
        return True  # 127.0.0.1, or a prefix such as "http://127." in a check
    return safety.is_loopback_host(host.rstrip("."))


def _authority_host(authority: str) -> str | None:
    """The literal host of a URL authority, or None when it is not literal."""
    authority = authority.rsplit("@", 1)[-1]
    if authority.startswith("["):
        return authority[1 : authority.find("]")] if "]" in authority else None
    if not authority or authority.startswith(_PLACEHOLDER_START):
        return None
    host = authority.split(":", 1)[0]
    if not host or any(c in host for c in "{}$%<>*"):
        return None
    return host


def _endpoint_value_host(value: str, quoted: bool, code: bool) -> str | None:
    """The host an endpoint setting's literal value names, or None if not literal."""
    if not value or value.startswith(_PLACEHOLDER_START) or "{{" in value:
        return None
    if "://" in value:
        return None  # the URL rule judges it
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else None
    host, _, port = value.partition(":")
    has_port = port.split("/", 1)[0].isdigit()
    try:
        ipaddress.ip_address(host)
        is_ip = True
    except ValueError:
        is_ip = False
    if code and not quoted:
        # Unquoted in Python is an expression (aws.url, self.moto_url): only a
        # literal-looking host:port or IP is judged.
        return host if (is_ip or has_port) else None
    looks_like_host = bool(re.fullmatch(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+", host))
    return host if (is_ip or has_port or looks_like_host) else None


def scan_text(name: str, text: str) -> list[str]:
    """Findings for one file's text, as ``name:line: reason``."""
    findings: list[str] = []
    code = name.endswith(_CODE_SUFFIXES)
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{name}:{number}"
        for match in _URL.finditer(line):
            host = _authority_host(match.group(2))
            if host is not None and not _host_is_loopback(host):
                findings.append(f"{where}: URL to non-loopback host {host!r}")
        for match in _IPV4.finditer(line):
            octets = [int(part) for part in match.groups()]
            if max(octets) <= 255 and octets[0] != 127:
                findings.append(f"{where}: IPv4 address {match.group(0)} is not loopback")
        for match in _ENDPOINT.finditer(line):
            key, quote, value = match.groups()
            host = _endpoint_value_host(value, bool(quote), code)
            if host is not None and not _host_is_loopback(host):
                findings.append(f"{where}: {key} names non-loopback host {host!r}")
        lowered = line.lower()
        if METADATA_V4 in line or METADATA_V6 in lowered:
            findings.append(f"{where}: the real instance metadata address")
        for match in _KEY_ID.finditer(line):
            if len(set(match.group(1))) > 1:
                findings.append(f"{where}: looks like an AWS access key id")
    return sorted(set(findings))


def scanned_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    files = []
    for name in sorted(set(filter(None, listed.split("\0")))):
        path = REPO / name
        if name.lower().endswith(".md") or path.is_symlink() or not path.is_file():
            continue
        files.append(path)
    return files


def test_static_scan_finds_no_non_loopback_endpoint_or_key() -> None:
    files = scanned_files()
    assert any(path.name == "test_safety.py" for path in files), "git listed no files"
    findings: list[str] = []
    for path in files:
        data = path.read_bytes()
        if b"\0" in data:
            continue
        findings += scan_text(str(path.relative_to(REPO)), data.decode("utf-8", "replace"))
    assert findings == [], "non-loopback endpoints or keys in tracked files:\n" + "\n".join(
        findings
    )


# The scanner's rules, each shown to fire (samples built at run time).
_FAR_HOST = ".".join(("mail", "example", "org"))


@pytest.mark.parametrize(
    ("name", "line", "reason"),
    [
        ("a.yml", f"# see {FAR_URL}/docs", "URL to non-loopback host"),
        ("a.py", f'client("ses", endpoint_url="{FAR_URL}")', "URL to non-loopback host"),
        ("a.yml", f"ses_aws_endpoint_url: {FAR_URL}", "URL to non-loopback host"),
        ("a.service", f"Environment=AWS_ENDPOINT_URL=http://{TEST_NET_1}:5000", "IPv4 address"),
        ("a.yml", f"ansible_host: {_FAR_HOST}", "ansible_host names non-loopback host"),
        ("a.py", f'endpoint_url="{_FAR_HOST}:443"', "endpoint_url names non-loopback host"),
        ("a.sh", f"lab/imds.py --moto-url {_FAR_HOST}:5000", "moto-url names non-loopback"),
        ("a.yml", f"AWS_ENDPOINT_URL: '{_FAR_HOST}'", "AWS_ENDPOINT_URL names non-loopback"),
        ("a.ini", "http" + "://[" + TEST_NET_6 + "]:80/", "URL to non-loopback host"),
        ("a.py", f"x = {METADATA_V4!r}", "the real instance metadata address"),
        ("a.py", f"x = 'http://[{METADATA_V6}]/'", "the real instance metadata address"),
        ("a.cfg", "key = AKIA" + "A1B2C3D4E5F6G7H8", "looks like an AWS access key id"),
        ("a.cfg", "key = ASIA" + "Z1Y2X3W4V5U6T7S8", "looks like an AWS access key id"),
        ("a.yml", "bind: " + ".".join("0" * 4), "is not loopback"),
    ],
)
def test_scan_rule_fires(name: str, line: str, reason: str) -> None:
    findings = scan_text(name, "first line\n" + line)
    assert findings, line
    assert all(f.startswith(f"{name}:2: ") for f in findings)
    assert any(reason in f for f in findings), findings


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("a.py", 'endpoint_url="http://127.0.0.1:24100"'),
        ("a.py", "endpoint_url=aws.url"),
        ("a.py", 'f"http://{host}:{port}/"'),
        ("a.yml", 'endpoint_url: "{{ ses_aws_endpoint_url | default(omit) }}"'),
        ("a.yml", "ansible_host: 127.0.0.1"),
        ("a.yml", "ansible_host: private_ip_address"),
        ("a.sh", 'AWS_EC2_METADATA_SERVICE_ENDPOINT="http://localhost:24151/"'),
        ("a.sh", "curl http://[::1]:24151/latest/api/token"),
        ("a.py", "AWS_ENDPOINT_URL=$MOTO_URL"),
        ("a.service", "ExecStart=/usr/bin/python3 /opt/x.py --host 127.0.0.9"),
        ("a.txt", "ansible-core==2.19.14 and version 1.2.3.4.5"),
        ("a.py", 'key = "AKIA" + "Z" * 16'),
        ("a.py", "key = '" + "AKIA" + "Z" * 16 + "'  # placeholder"),
        ("a.ini", "path = file:///etc/ssl/certs"),
    ],
)
def test_scan_rule_accepts(name: str, line: str) -> None:
    assert scan_text(name, line) == []
