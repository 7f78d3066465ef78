#!/usr/bin/env python3
"""Start and stop the ses-mailer-ops test lab.

The lab is an emulated AWS account (moto on loopback) plus EC2-like hosts:
Debian root filesystems booted with systemd-nspawn, sharing the host's network
namespace, each with sshd on 127.0.0.1:<port> and its own fake IMDSv2 server.

Commands:
  up      build or reuse the cached images, start moto, seed it, boot the hosts,
          start one fake IMDS per host and write the inventory
  down    stop everything ``up`` recorded, unmount and remove the throw-away roots
  status  show what the state dir records and whether it is alive
  env     print ``export`` lines for controller processes

Knobs are environment variables, see docs/DESIGN.md ("The lab").  Expected
failures end with one line on stderr and a non-zero exit status; ``--debug``
shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
IMDS_SCRIPT = REPO / "lab" / "imds.py"
DEFAULT_INVENTORY_LINK = REPO / "inventory" / "lab" / "hosts.yml"

EX_OK = 0
EX_USAGE = 64
EX_UNAVAILABLE = 69  # a tool or a port the lab needs is not available
EX_SOFTWARE = 70  # something the lab started did not come up
EX_TEMPFAIL = 75  # the lab is already running

SUITES = ("bookworm", "trixie")
IMAGE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "openssh-server")
# Units that would fight the host or make runs non-deterministic: the timers
# would run apt in the background while a role installs packages.
MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer")
DUMMY_KEY = "testing"
# Endpoints pinned to loopback in every host's /etc/hosts (see etc_hosts()).
AWS_DOMAIN = "amazonaws.com"
AWS_REGIONAL_SERVICES = ("sts", "email", "ec2", "iam", "ssm")
AWS_GLOBAL_SERVICES = ("sts", "iam")
MAX_HOSTS = 39  # ssh ports base+11.. must stay below the IMDS ports base+51..
BOOT_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
MOTO_TIMEOUT = 60.0
IMDS_TIMEOUT = 60.0
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Hierarchies a host gets its own cgroup in: name=systemd and the unified one so
# that concurrent containers do not share nspawn's payload/supervisor groups,
# memory so that each host's memory can be read.
CGROUP_HIERARCHIES = ("name=systemd", "", "memory")
SSH_OPTIONS = (
    "-o", "BatchMode=yes",
    "-o", "ConnectTimeout=3",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "StrictHostKeyChecking=no",
    "-o", "IdentitiesOnly=yes",
    "-o", "LogLevel=ERROR",
)  # fmt: skip


class LabError(Exception):
    """An expected failure: reported as one line, with an exit status."""

    def __init__(self, message: str, status: int = EX_SOFTWARE) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Settings:
    """The lab's knobs, read from the environment (see docs/DESIGN.md)."""

    state: Path
    cache: Path
    port_base: int
    region: str
    sender: str

    @property
    def moto_url(self) -> str:
        return f"http://127.0.0.1:{self.port_base}"

    @property
    def lab_id(self) -> str:
        """Short name unique per state dir, for machine and cgroup names."""
        digest = hashlib.sha256(str(self.state).encode()).hexdigest()[:8]
        return f"sesl-{digest}"

    def ssh_port(self, index: int) -> int:
        return self.port_base + 10 + index

    def imds_port(self, index: int) -> int:
        return self.port_base + 50 + index

    @property
    def is_default_state(self) -> bool:
        return self.state == (REPO / ".lab" / "default").resolve()


def read_settings(environ: dict[str, str]) -> Settings:
    state = Path(environ.get("SES_LAB_STATE") or REPO / ".lab" / "default")
    cache = Path(environ.get("SES_LAB_CACHE") or "/var/cache/ses-mailer-ops")
    raw_base = environ.get("SES_LAB_PORT_BASE") or "24100"
    try:
        port_base = int(raw_base)
    except ValueError:
        raise LabError(f"SES_LAB_PORT_BASE must be a number, not {raw_base!r}", EX_USAGE) from None
    if not 1024 <= port_base <= 65535 - 100:
        raise LabError(f"SES_LAB_PORT_BASE {port_base} is outside 1024..65435", EX_USAGE)
    region = environ.get("SES_LAB_REGION") or "us-east-1"
    if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", region):
        raise LabError(f"SES_LAB_REGION {region!r} does not look like a region", EX_USAGE)
    sender = environ.get("SES_LAB_SENDER") or "mailer@example.com"
    if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", sender):
        raise LabError(f"SES_LAB_SENDER {sender!r} is not an e-mail address", EX_USAGE)
    return Settings(state.resolve(), cache.resolve(), port_base, region, sender)


# --------------------------------------------------------------------------
# Recorded state


@dataclass
class Proc:
    """A process the lab started: pid plus its start time, to survive pid reuse."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> Proc:
        return cls(pid, proc_start_time(pid) or 0)

    def alive(self) -> bool:
        return self.start != 0 and proc_start_time(self.pid) == self.start


@dataclass
class Host:
    name: str
    index: int
    suite: str
    ssh_port: int
    imds_url: str
    instance_id: str
    machine: str
    dir: str
    root: str
    mount: str  # "overlay" or "copy"
    nspawn: Proc | None = None
    imds: Proc | None = None
    cgroups: list[str] = field(default_factory=list)


@dataclass
class Lab:
    state: str
    moto_url: str
    region: str
    account_id: str
    sender: str
    port_base: int
    cache: str
    moto: Proc | None = None
    hosts: list[Host] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Lab:
        data = json.loads(path.read_text())
        hosts = []
        for raw in data.pop("hosts"):
            nspawn, imds = raw.pop("nspawn"), raw.pop("imds")
            hosts.append(
                Host(
                    **raw,
                    nspawn=Proc(**nspawn) if nspawn else None,
                    imds=Proc(**imds) if imds else None,
                )
            )
        moto = data.pop("moto")
        return cls(**data, moto=Proc(**moto) if moto else None, hosts=hosts)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)

    def processes(self) -> Iterator[tuple[str, Proc]]:
        if self.moto:
            yield "moto", self.moto
        for host in self.hosts:
            if host.nspawn:
                yield f"{host.name} nspawn", host.nspawn
            if host.imds:
                yield f"{host.name} imds", host.imds


def proc_start_time(pid: int) -> int | None:
    """Start time of a pid in clock ticks (field 22 of /proc/pid/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


# --------------------------------------------------------------------------
# Small helpers


def say(message: str) -> None:
    print(f"lab: {message}", flush=True)


def run(cmd: list[str], *, what: str, timeout: float = 600, log: Path | None = None) -> str:
    """Run a command; on failure raise LabError naming ``what``."""
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise LabError(f"{what}: timed out after {timeout:.0f} s") from None
    if log is not None:
        with log.open("a") as handle:
            handle.write(f"$ {' '.join(cmd)}\n{result.stdout}{result.stderr}")
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        hint = f" (log: {log})" if log is not None else ""
        raise LabError(f"{what} failed with status {result.returncode}: {detail}{hint}")
    return result.stdout


@contextlib.contextmanager
def file_lock(path: Path, waiting: str = "") -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if needed).

    ``waiting`` is said when another process holds the lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                say(waiting)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def require_tools() -> None:
    for tool in ("debootstrap", "systemd-nspawn", "ssh", "ssh-keygen", "chroot", "mount"):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} is not installed; `make apt` installs it", EX_UNAVAILABLE)
    if os.geteuid() != 0:
        raise LabError("the lab needs root (debootstrap, mounts, systemd-nspawn)", EX_UNAVAILABLE)


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def controller_env(settings: Settings) -> dict[str, str]:
    """Environment for processes on the controller: loopback endpoints, dummy keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=settings.moto_url,
        AWS_ACCESS_KEY_ID=DUMMY_KEY,
        AWS_SECRET_ACCESS_KEY=DUMMY_KEY,
        AWS_DEFAULT_REGION=settings.region,
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


def start_daemon(cmd: list[str], log: Path, env: dict[str, str]) -> Proc:
    """Start a process in its own session with output to ``log``."""
    with log.open("ab") as out:
        child = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    return Proc.of(child.pid)


def wait_http(url: str, method: str, headers: dict[str, str], timeout: float, proc: Proc) -> None:
    deadline = time.monotonic() + timeout
    while True:
        request = urllib.request.Request(url, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if not proc.alive():
            raise LabError(f"process {proc.pid} serving {url} exited")
        if time.monotonic() > deadline:
            raise LabError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.2)


def stop_processes(procs: list[Proc], timeout: float) -> None:
    """SIGTERM all, wait, then SIGKILL, but only processes that are still ours."""
    live = [proc for proc in procs if proc.alive()]
    for proc in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
    if wait_gone(live, timeout):
        return
    for proc in live:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
    wait_gone(live, 5)


def wait_gone(procs: list[Proc], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(p.alive() for p in procs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# --------------------------------------------------------------------------
# Images


def image_dir(settings: Settings, suite: str) -> Path:
    return settings.cache / "images" / suite


def ensure_image(settings: Settings, suite: str) -> Path:
    """Return the cached root filesystem of ``suite``, building it once.

    The build runs in a temporary directory next to the final one and is renamed
    into place when complete, under an flock, so concurrent labs neither build
    twice nor see a half-built image.
    """
    final = image_dir(settings, suite)
    if final.is_dir():
        return final
    images = final.parent
    waiting = f"waiting for another lab to build the {suite} image"
    with file_lock(images / f".{suite}.lock", waiting):
        if final.is_dir():
            return final
        for stale in images.glob(f".build-{suite}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        build = Path(tempfile.mkdtemp(prefix=f".build-{suite}-", dir=images))
        log = images / f"{suite}.build.log"
        log.write_text("")
        say(f"building the {suite} image (debootstrap, about a minute)")
        started = time.monotonic()
        try:
            run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(IMAGE_PACKAGES)}",
                    suite,
                    str(build),
                ],
                what=f"debootstrap {suite}",
                timeout=1800,
                log=log,
            )
            prepare_image(build, log)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        build.chmod(0o755)
        build.rename(final)
        say(f"built the {suite} image in {time.monotonic() - started:.0f} s")
    return final


def prepare_image(root: Path, log: Path) -> None:
    """Make a fresh debootstrap tree a neutral base for every host."""
    run(["chroot", str(root), "apt-get", "clean"], what="apt-get clean in the image", log=log)
    # Per-host identity is written by `up`: machine id and ssh host keys.
    (root / "etc" / "machine-id").write_text("")
    with contextlib.suppress(FileNotFoundError):
        (root / "var" / "lib" / "dbus" / "machine-id").unlink()
    for key in (root / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()
    units = root / "etc" / "systemd" / "system"
    for unit in MASKED_UNITS:
        target = units / unit
        target.unlink(missing_ok=True)
        target.symlink_to("/dev/null")


# --------------------------------------------------------------------------
# Hosts


def host_layout(settings: Settings, index: int, suite: str) -> Host:
    name = f"lab-{index}"
    hdir = settings.state / "hosts" / name
    return Host(
        name=name,
        index=index,
        suite=suite,
        ssh_port=settings.ssh_port(index),
        imds_url=f"http://127.0.0.1:{settings.imds_port(index)}/",
        instance_id="",
        machine=f"{settings.lab_id}-{index}",
        dir=str(hdir),
        root=str(hdir / "root"),
        mount="",
    )


def host_log(host: Host, what: str) -> Path:
    """Logs live outside the host's dir so that they survive `down`."""
    return Path(host.dir).parent.parent / "logs" / f"{host.name}-{what}.log"


def make_root(host: Host, image: Path) -> None:
    """A throw-away root: an overlay on the cached image, else a copy."""
    hdir, root = Path(host.dir), Path(host.root)
    upper, work = hdir / "upper", hdir / "work"
    for path in (root, upper, work):
        path.mkdir(parents=True)
    options = f"lowerdir={image},upperdir={upper},workdir={work}"
    result = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode == 0:
        host.mount = "overlay"
        return
    root.rmdir()
    run(["cp", "-a", "--reflink=auto", str(image), str(root)], what=f"copy root for {host.name}")
    host.mount = "copy"


def etc_hosts(name: str, region: str) -> str:
    """/etc/hosts for a host, sending the AWS endpoints the project uses to loopback.

    A guard, not a route: boto3 older than 1.28 (Debian bookworm has 1.26) ignores
    AWS_ENDPOINT_URL, and a client that forgets its endpoint would otherwise try
    the real service.  With these entries it gets "connection refused" instead.
    """
    lines = ["127.0.0.1\tlocalhost", f"127.0.1.1\t{name}", "::1\tlocalhost ip6-localhost"]
    names = [f"{service}.{region}.{AWS_DOMAIN}" for service in AWS_REGIONAL_SERVICES]
    names += [f"{service}.{AWS_DOMAIN}" for service in AWS_GLOBAL_SERVICES]
    lines += [f"127.0.0.1\t{endpoint}" for endpoint in names]
    return "\n".join(lines) + "\n"


def personalise_root(host: Host, settings: Settings, pubkey: str) -> None:
    """Write the host's identity into its throw-away root."""
    root = Path(host.root)
    (root / "etc" / "machine-id").write_text(uuid.uuid4().hex + "\n")
    (root / "etc" / "hostname").write_text(host.name + "\n")
    (root / "etc" / "hosts").write_text(etc_hosts(host.name, settings.region))
    ssh_dir = root / "etc" / "ssh"
    key = ssh_dir / "ssh_host_ed25519_key"
    run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.name, "-f", str(key)],
        what=f"host key for {host.name}",
    )
    (ssh_dir / "sshd_config.d" / "ses-lab.conf").write_text(
        "# Written by lab/labctl.py: loopback only, the lab's key only.\n"
        f"ListenAddress 127.0.0.1:{host.ssh_port}\n"
        "HostKey /etc/ssh/ssh_host_ed25519_key\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UseDNS no\n"
    )
    root_ssh = root / "root" / ".ssh"
    root_ssh.mkdir(mode=0o700, exist_ok=True)
    auth = root_ssh / "authorized_keys"
    auth.write_text(pubkey)
    auth.chmod(0o600)
    apt_dir = Path(host.dir) / "apt-archives"
    fill_apt_archives(settings.cache / "apt" / host.suite, apt_dir)


def fill_apt_archives(shared: Path, private: Path) -> None:
    """Give a host its own apt archive dir, pre-filled from the shared cache.

    A bind mount of one shared dir would make concurrent ``apt-get install`` on
    two hosts of one suite fail on apt's archive lock; hard links cost nothing
    and new packages go back into the shared cache at ``down``.
    """
    (private / "partial").mkdir(parents=True, exist_ok=True)
    shared.mkdir(parents=True, exist_ok=True)
    for deb in shared.glob("*.deb"):
        link_or_copy(deb, private / deb.name)


def harvest_apt_archives(private: Path, shared: Path) -> int:
    """Put packages a host downloaded into the shared cache; return how many."""
    added = 0
    if not private.is_dir():
        return added
    shared.mkdir(parents=True, exist_ok=True)
    with file_lock(shared / ".lock"):
        for deb in private.glob("*.deb"):
            target = shared / deb.name
            if target.exists():
                continue
            tmp = shared / f".{deb.name}.tmp"
            link_or_copy(deb, tmp)
            tmp.replace(target)
            added += 1
    return added


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except FileExistsError:
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copy2(source, target)


def own_cgroup(hierarchy: str) -> Path | None:
    """This process's cgroup dir in a v1 hierarchy ("" = the unified one)."""
    mounts = {"name=systemd": "systemd", "": "unified", "memory": "memory"}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == hierarchy or hierarchy in controllers.split(","):
            base = CGROUP_ROOT / mounts[hierarchy]
            if (base / "cgroup.procs").exists():
                return base / path.lstrip("/")
    return None


def make_cgroups(host: Host) -> list[Path]:
    """One cgroup per host in each hierarchy we can write; returns cgroup.procs files."""
    procs = []
    for hierarchy in CGROUP_HIERARCHIES:
        parent = own_cgroup(hierarchy)
        if parent is None:
            continue
        group = parent / host.machine
        try:
            group.mkdir(exist_ok=True)
        except OSError:
            continue
        host.cgroups.append(str(group))
        procs.append(group / "cgroup.procs")
    return procs


def remove_cgroups(host: Host) -> None:
    for group in host.cgroups:
        top = Path(group)
        if not top.is_dir():
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                Path(dirpath).rmdir()


def cgroup_pids(host: Host) -> list[int]:
    pids: list[int] = []
    for group in host.cgroups:
        for procs in Path(group).rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.extend(int(p) for p in procs.read_text().split())
    return sorted(set(pids))


def boot_host(host: Host, log: Path) -> None:
    cgroup_procs = make_cgroups(host)
    nspawn = [
        "systemd-nspawn",
        f"--directory={host.root}",
        f"--machine={host.machine}",
        f"--hostname={host.name}",
        f"--uuid={(Path(host.root) / 'etc' / 'machine-id').read_text().strip()}",
        "--boot",
        "--register=no",
        "--keep-unit",
        "--console=passive",
        "--link-journal=no",
        f"--bind={Path(host.dir) / 'apt-archives'}:/var/cache/apt/archives",
    ]
    # Move into the host's own cgroups first, then exec nspawn: nspawn creates
    # its payload/supervisor groups below the cgroup it starts in.
    script = 'while [ "$1" != -- ]; do echo $$ > "$1"; shift; done; shift; exec "$@"'
    cmd = ["/bin/sh", "-c", script, "sh", *map(str, cgroup_procs), "--", *nspawn]
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "LANG": "C.UTF-8",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    host.nspawn = start_daemon(cmd, log, env)


def ssh_cmd(host: Host, key: Path, *remote: str) -> list[str]:
    port = str(host.ssh_port)
    return ["ssh", *SSH_OPTIONS, "-i", str(key), "-p", port, "root@127.0.0.1", *remote]


def wait_running(host: Host, key: Path, timeout: float) -> str:
    """Wait until systemd in the host reports its state over SSH; return it."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if host.nspawn is None or not host.nspawn.alive():
            raise LabError(f"{host.name}: systemd-nspawn exited (log: {host_log(host, 'nspawn')})")
        left = max(5.0, deadline - time.monotonic())
        try:
            result = subprocess.run(
                ssh_cmd(host, key, "systemctl", "is-system-running", "--wait"),
                capture_output=True,
                text=True,
                timeout=left,
                check=False,
            )
        except subprocess.TimeoutExpired:
            break
        state = result.stdout.strip()
        if state in ("running", "degraded"):
            return state
        last = state or (result.stderr.strip().splitlines() or ["no answer"])[-1]
        time.sleep(0.3)
    raise LabError(f"{host.name} did not reach multi-user within {timeout:.0f} s: {last}")


# --------------------------------------------------------------------------
# moto and the fake IMDS


def seed_moto(settings: Settings, lab: Lab, hosts: list[Host]) -> None:
    """Verified sender identity and one EC2 instance record per host."""
    import botocore.exceptions  # noqa: PLC0415  (slow imports, only `up` needs them)

    try:
        seed_moto_calls(settings, lab, hosts)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise LabError(f"seeding moto at {settings.moto_url} failed: {exc}") from exc


def seed_moto_calls(settings: Settings, lab: Lab, hosts: list[Host]) -> None:
    import boto3  # noqa: PLC0415

    session = boto3.session.Session(
        aws_access_key_id=DUMMY_KEY,
        aws_secret_access_key=DUMMY_KEY,
        region_name=settings.region,
    )
    url = settings.moto_url
    lab.account_id = session.client("sts", endpoint_url=url).get_caller_identity()["Account"]
    session.client("ses", endpoint_url=url).verify_email_identity(EmailAddress=settings.sender)
    # moto 5.2.5 reports VerifiedForSendingStatus false for every identity (it is
    # hard-coded); VerificationStatus and SES v1 show the verification.
    identity = session.client("sesv2", endpoint_url=url).get_email_identity(
        EmailIdentity=settings.sender
    )
    if identity.get("VerificationStatus") != "SUCCESS":
        raise LabError(f"moto did not verify {settings.sender}")
    if not hosts:
        return
    ec2 = session.client("ec2", endpoint_url=url)
    images = ec2.describe_images(Owners=["amazon"])["Images"] or ec2.describe_images()["Images"]
    if not images:
        raise LabError("moto knows no AMI to start instance records from")
    ami = sorted(image["ImageId"] for image in images)[0]
    state_name = settings.state.name
    for host in hosts:
        reply = ec2.run_instances(
            ImageId=ami,
            MinCount=1,
            MaxCount=1,
            InstanceType="t3.micro",
            MetadataOptions={"HttpTokens": "required", "HttpEndpoint": "enabled"},
            TagSpecifications=[
                {
                    "ResourceType": "instance",
                    "Tags": [
                        {"Key": "Name", "Value": host.name},
                        {"Key": "ses-mailer-ops:lab", "Value": state_name},
                    ],
                }
            ],
        )
        host.instance_id = reply["Instances"][0]["InstanceId"]


def start_imds(settings: Settings, host: Host) -> None:
    if not IMDS_SCRIPT.is_file():
        raise LabError(f"{IMDS_SCRIPT} is missing: the fake IMDS cannot start")
    port = settings.imds_port(host.index)
    cmd = [
        sys.executable,
        str(IMDS_SCRIPT),
        "--port", str(port),
        "--instance-id", host.instance_id,
        "--moto-url", settings.moto_url,
        "--region", settings.region,
    ]  # fmt: skip
    host.imds = start_daemon(cmd, host_log(host, "imds"), controller_env(settings))


def wait_imds(host: Host) -> None:
    assert host.imds is not None
    wait_http(
        f"{host.imds_url}latest/api/token",
        "PUT",
        {"X-aws-ec2-metadata-token-ttl-seconds": "60"},
        IMDS_TIMEOUT,
        host.imds,
    )


# --------------------------------------------------------------------------
# Inventory


def yaml_scalar(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))  # a JSON string is a valid double-quoted YAML scalar


def yaml_lines(data: dict[str, Any], indent: int = 0) -> Iterator[str]:
    pad = " " * indent
    for key, value in data.items():
        if isinstance(value, dict):
            if value:
                yield f"{pad}{key}:"
                yield from yaml_lines(value, indent + 2)
            else:
                yield f"{pad}{key}: {{}}"
        else:
            yield f"{pad}{key}: {yaml_scalar(value)}"


def inventory(lab: Lab, key: Path) -> dict[str, Any]:
    hosts: dict[str, Any] = {}
    for host in lab.hosts:
        hosts[host.name] = {
            "ansible_host": "127.0.0.1",
            "ansible_port": host.ssh_port,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(key),
            "ansible_python_interpreter": "/usr/bin/python3",
            "instance_id": host.instance_id,
            "ses_lab_suite": host.suite,
            "ses_mailer_environment": {
                "AWS_ENDPOINT_URL": lab.moto_url,
                "AWS_EC2_METADATA_SERVICE_ENDPOINT": host.imds_url,
            },
        }
    return {
        "all": {
            "vars": {
                "ses_aws_endpoint_url": lab.moto_url,
                "ses_aws_region": lab.region,
                "ses_lab_sender": lab.sender,
                "ansible_ssh_common_args": (
                    "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no"
                    " -o IdentitiesOnly=yes"
                ),
            },
            "children": {"ses_mailers": {"hosts": hosts}},
        }
    }


def write_inventory(settings: Settings, lab: Lab, key: Path) -> Path:
    path = settings.state / "hosts.yml"
    lines = [
        "---",
        "# Written by lab/labctl.py up; removed by down. Loopback endpoints only.",
        *yaml_lines(inventory(lab, key)),
    ]
    path.write_text("\n".join(lines) + "\n")
    if settings.is_default_state:
        link = DEFAULT_INVENTORY_LINK
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(path, link.parent))
    return path


# --------------------------------------------------------------------------
# Commands


def lab_file(settings: Settings) -> Path:
    return settings.state / "lab.json"


def cmd_up(settings: Settings, count: int, suites: list[str]) -> int:
    require_tools()
    state_file = lab_file(settings)
    if state_file.exists():
        old = Lab.load(state_file)
        if any(proc.alive() for _, proc in old.processes()):
            raise LabError(
                f"a lab is already running in {settings.state}; run `make lab-down` first",
                EX_TEMPFAIL,
            )
        say("cleaning up a stale lab record (nothing of it was running)")
        teardown(settings, old)
    ports = [settings.port_base]
    for index in range(1, count + 1):
        ports += [settings.ssh_port(index), settings.imds_port(index)]
    for port in ports:
        if not port_free(port):
            raise LabError(
                f"port 127.0.0.1:{port} is in use; stop its user or set SES_LAB_PORT_BASE",
                EX_UNAVAILABLE,
            )
    started = time.monotonic()
    wanted = [suites[(i - 1) % len(suites)] for i in range(1, count + 1)]
    suites_needed = list(dict.fromkeys(wanted))
    with ThreadPoolExecutor(max_workers=max(1, len(suites_needed))) as pool:
        built = pool.map(lambda suite: ensure_image(settings, suite), suites_needed)
        images = dict(zip(suites_needed, built))

    settings.state.mkdir(parents=True, exist_ok=True)
    (settings.state / "hosts").mkdir(exist_ok=True)
    logs = settings.state / "logs"
    if logs.is_dir():
        shutil.rmtree(logs)
    logs.mkdir()
    lab = Lab(
        state=str(settings.state),
        moto_url=settings.moto_url,
        region=settings.region,
        account_id="",
        sender=settings.sender,
        port_base=settings.port_base,
        cache=str(settings.cache),
    )
    lab.save(state_file)
    try:
        bring_up(settings, lab, images, wanted)
    except BaseException:
        say("start-up failed; stopping what was started")
        teardown(settings, lab)
        raise
    say(
        f"lab is up in {time.monotonic() - started:.1f} s: {len(lab.hosts)} host(s), moto at "
        f"{lab.moto_url}, inventory {settings.state / 'hosts.yml'}"
    )
    return EX_OK


def bring_up(settings: Settings, lab: Lab, images: dict[str, Path], wanted: list[str]) -> None:
    state_file = lab_file(settings)
    env = controller_env(settings)
    moto_bin = Path(sys.executable).parent / "moto_server"
    lab.moto = start_daemon(
        [str(moto_bin), "-H", "127.0.0.1", "-p", str(settings.port_base)],
        settings.state / "logs" / "moto.log",
        env,
    )
    lab.save(state_file)

    key = settings.state / "id_ed25519"
    for old in (key, key.with_suffix(".pub")):
        old.unlink(missing_ok=True)
    run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ses-lab", "-f", str(key)],
        what="lab ssh key",
    )
    pubkey = key.with_suffix(".pub").read_text()

    phases: dict[str, float] = {}
    mark = time.monotonic()
    for index, suite in enumerate(wanted, start=1):
        host = host_layout(settings, index, suite)
        hdir = Path(host.dir)
        if hdir.exists():
            remove_host(settings, host)  # left over from a crash: unmounts before removing
        hdir.mkdir(parents=True)
        lab.hosts.append(host)
        lab.save(state_file)
        make_root(host, images[suite])
        lab.save(state_file)
        personalise_root(host, settings, pubkey)
        boot_host(host, host_log(host, "nspawn"))
        lab.save(state_file)
    phases["roots"] = time.monotonic() - mark
    mark = time.monotonic()

    wait_http(f"{settings.moto_url}/moto-api/", "GET", {}, MOTO_TIMEOUT, lab.moto)
    seed_moto(settings, lab, lab.hosts)
    lab.save(state_file)
    for host in lab.hosts:
        start_imds(settings, host)
        lab.save(state_file)
    for host in lab.hosts:
        wait_imds(host)
    phases["moto+imds"] = time.monotonic() - mark
    mark = time.monotonic()

    with ThreadPoolExecutor(max_workers=max(1, len(lab.hosts))) as pool:
        states = list(pool.map(lambda h: wait_running(h, key, BOOT_TIMEOUT), lab.hosts))
    for host, state in zip(lab.hosts, states):
        if state != "running":
            failed = subprocess.run(
                ssh_cmd(host, key, "systemctl", "--failed", "--no-legend", "--plain"),
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout.split()
            units = [word for word in failed if "." in word]
            print(
                f"lab: warning: {host.name} is {state}; failed units: "
                f"{', '.join(units) or 'none listed'}",
                file=sys.stderr,
            )
    phases["boot"] = time.monotonic() - mark
    write_inventory(settings, lab, key)
    lab.save(state_file)
    say(
        f"roots made and nspawn started in {phases['roots']:.1f} s, moto seeded and IMDS up"
        f" in {phases['moto+imds']:.1f} s, systemd running in {phases['boot']:.1f} s more"
    )


def teardown(settings: Settings, lab: Lab) -> dict[str, float]:
    """Stop and remove everything ``lab`` records; safe to repeat."""
    timings: dict[str, float] = {}
    started = time.monotonic()
    booted = [h for h in lab.hosts if h.nspawn is not None and h.nspawn.alive()]
    for host in booted:
        assert host.nspawn is not None
        # systemd-nspawn turns SIGTERM into an orderly poweroff of the container.
        with contextlib.suppress(ProcessLookupError):
            os.kill(host.nspawn.pid, signal.SIGTERM)
    if not wait_gone([h.nspawn for h in booted if h.nspawn], STOP_TIMEOUT):
        for host in booted:
            if host.nspawn and host.nspawn.alive():
                print(
                    f"lab: warning: {host.name} did not power off in {STOP_TIMEOUT:.0f} s; "
                    "killing it",
                    file=sys.stderr,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(host.nspawn.pid, signal.SIGKILL)
        wait_gone([h.nspawn for h in booted if h.nspawn], 10)
    for host in lab.hosts:
        # Whatever is still in the host's own cgroups was started by its nspawn.
        for pid in cgroup_pids(host):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    timings["hosts"] = time.monotonic() - started
    services = [host.imds for host in lab.hosts if host.imds]
    stop_processes([*services, *([lab.moto] if lab.moto else [])], 10)
    timings["services"] = time.monotonic() - started - timings["hosts"]
    for host in lab.hosts:
        remove_host(settings, host)
    for name in ("hosts.yml", "id_ed25519", "id_ed25519.pub"):
        (settings.state / name).unlink(missing_ok=True)
    if settings.is_default_state and DEFAULT_INVENTORY_LINK.is_symlink():
        DEFAULT_INVENTORY_LINK.unlink()
    lab_file(settings).unlink(missing_ok=True)
    timings["total"] = time.monotonic() - started
    return timings


def remove_host(settings: Settings, host: Host) -> None:
    hdir, root = Path(host.dir), Path(host.root)
    if is_mountpoint(root):
        for attempt in range(20):
            result = subprocess.run(["umount", str(root)], capture_output=True, check=False)
            if result.returncode == 0 or not is_mountpoint(root):
                break
            time.sleep(0.25 * (attempt + 1))
        else:
            raise LabError(f"cannot unmount {root}: still busy")
    added = harvest_apt_archives(hdir / "apt-archives", settings.cache / "apt" / host.suite)
    if added:
        say(f"{host.name}: kept {added} downloaded package(s) in the shared apt cache")
    remove_cgroups(host)
    if hdir.exists():
        shutil.rmtree(hdir)


def is_mountpoint(path: Path) -> bool:
    target = str(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].encode().decode("unicode_escape")
        if mount_point == target:
            return True
    return False


def cmd_down(settings: Settings) -> int:
    state_file = lab_file(settings)
    if not state_file.exists():
        say(f"no lab recorded in {settings.state}; nothing to stop")
        return EX_OK
    lab = Lab.load(state_file)
    timings = teardown(settings, lab)
    with contextlib.suppress(OSError):
        (settings.state / "hosts").rmdir()
    say(
        f"lab is down in {timings['total']:.1f} s (hosts powered off in {timings['hosts']:.1f} s,"
        f" moto and IMDS stopped in {timings['services']:.1f} s)"
    )
    return EX_OK


def cmd_status(settings: Settings) -> int:
    state_file = lab_file(settings)
    if not state_file.exists():
        print(f"no lab in {settings.state}")
        return EX_UNAVAILABLE
    lab = Lab.load(state_file)
    moto = "up" if lab.moto and lab.moto.alive() else "down"
    print(
        f"state {lab.state}\nmoto {lab.moto_url} {moto} region {lab.region} "
        f"account {lab.account_id} sender {lab.sender}"
    )
    for host in lab.hosts:
        booted = "up" if host.nspawn and host.nspawn.alive() else "down"
        imds = "up" if host.imds and host.imds.alive() else "down"
        print(
            f"{host.name} {host.suite} ssh 127.0.0.1:{host.ssh_port} {booted} "
            f"imds {host.imds_url} {imds} {host.instance_id}"
        )
    alive = all(p.alive() for _, p in lab.processes())
    return EX_OK if alive else EX_SOFTWARE


def cmd_env(settings: Settings) -> int:
    if not lab_file(settings).exists():
        raise LabError(f"no lab in {settings.state}; run `make lab-up` first", EX_UNAVAILABLE)
    lab = Lab.load(lab_file(settings))
    values = {
        "AWS_ENDPOINT_URL": lab.moto_url,
        "AWS_ACCESS_KEY_ID": DUMMY_KEY,
        "AWS_SECRET_ACCESS_KEY": DUMMY_KEY,
        "AWS_DEFAULT_REGION": lab.region,
        "AWS_EC2_METADATA_DISABLED": "true",
        # The default lab's inventory is linked beside inventory/lab/group_vars,
        # so playbooks get the lab's jobs and senders with it.
        "ANSIBLE_INVENTORY": str(
            DEFAULT_INVENTORY_LINK if settings.is_default_state else Path(lab.state) / "hosts.yml"
        ),
        "SES_LAB_STATE": lab.state,
    }
    for name, value in values.items():
        print(f"export {name}={value}")
    return EX_OK


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="labctl.py", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the lab")
    up.add_argument("--hosts", type=int, default=2, help="number of hosts (0: moto only)")
    up.add_argument(
        "--suites",
        default=",".join(SUITES),
        help="comma-separated Debian suites, cycled over the hosts",
    )
    commands.add_parser("down", help="stop the lab and remove its roots")
    commands.add_parser("status", help="show the recorded lab and what is alive")
    commands.add_parser("env", help="print export lines for controller processes")
    args = parser.parse_args(argv)
    if args.command == "up":
        if not 0 <= args.hosts <= MAX_HOSTS:
            parser.error(f"--hosts must be between 0 and {MAX_HOSTS}")
        suites = [s for s in args.suites.split(",") if s]
        unknown = [s for s in suites if s not in SUITES]
        if unknown or not suites:
            parser.error(f"--suites takes {', '.join(SUITES)}")
        args.suite_list = suites
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = read_settings(dict(os.environ))
        if args.command == "up":
            return cmd_up(settings, args.hosts, args.suite_list)
        if args.command == "down":
            return cmd_down(settings)
        if args.command == "status":
            return cmd_status(settings)
        return cmd_env(settings)
    except LabError as exc:
        if args.debug:
            raise
        print(f"labctl: error: {exc}", file=sys.stderr)
        return exc.status
    except (OSError, subprocess.SubprocessError) as exc:
        if args.debug:
            raise
        print(f"labctl: error: {exc} (--debug shows the traceback)", file=sys.stderr)
        return EX_SOFTWARE
    except KeyboardInterrupt:
        print("labctl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
