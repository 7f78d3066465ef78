"""The lab end to end: boot real nspawn hosts, reach them by SSH, follow the role chain.

These tests start a lab of their own (state dir under pytest's tmp, port base
picked among free ones from 26300 on) with ``lab/labctl.py`` as a subprocess and
always take it down.
They need root, systemd-nspawn and debootstrap (``make apt``); if the lab cannot
boot they fail, they are never skipped.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.safety import DUMMY_KEY, is_loopback_url, loopback_env

REPO = Path(__file__).resolve().parents[2]
LABCTL = [sys.executable, str(REPO / "lab" / "labctl.py")]
FIRST_PORT_BASE = 26300  # the default lab uses 24100; keep clear of it
UP_TIMEOUT = 1500  # a first run builds both images (about a minute each)
DOWN_TIMEOUT = 120
APT_TIMEOUT = 600

# Runs inside a host: the caller identity as boto3 sees it there. The endpoint
# is passed explicitly because bookworm's boto3 (1.26) ignores AWS_ENDPOINT_URL.
WHOAMI = (
    "import os, boto3, botocore.exceptions\n"
    "try:\n"
    "    sts = boto3.client('sts', endpoint_url=os.environ['AWS_ENDPOINT_URL'])\n"
    "    print(sts.get_caller_identity()['Arn'])\n"
    "except botocore.exceptions.NoCredentialsError:\n"
    "    print('NO-CREDENTIALS')\n"
)


@dataclass
class Lab:
    state: Path
    env: dict[str, str]
    record: dict[str, Any]
    port_base: int

    @property
    def key(self) -> Path:
        return self.state / "id_ed25519"

    def ssh(self, host: dict[str, Any], command: str, timeout: float = 60) -> str:
        result = subprocess.run(
            [
                "ssh", "-i", str(self.key), "-p", str(host["ssh_port"]),
                "-o", "BatchMode=yes", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "StrictHostKeyChecking=no", "-o", "LogLevel=ERROR",
                "root@127.0.0.1", command,
            ],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"{host['name']}: {command!r} failed: {result.stderr}"
        return result.stdout

    @property
    def moto_url(self) -> str:
        return str(self.record["moto_url"])

    @property
    def aws(self) -> boto3.session.Session:
        return moto_session(self.record["region"])


def moto_session(region: str) -> boto3.session.Session:
    return boto3.session.Session(
        aws_access_key_id=DUMMY_KEY, aws_secret_access_key=DUMMY_KEY, region_name=region
    )


def ansible_inventory(path: Path) -> dict[str, Any]:
    """The inventory as Ansible itself reads it."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-inventory"), "-i", str(path), "--list"],
        env=loopback_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def port_taken(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def free_port_base(hosts: int) -> int:
    """A port base whose moto, ssh and IMDS ports are all free (other labs may run)."""
    for base in range(FIRST_PORT_BASE, 30000, 100):
        ports = [base, *(base + 10 + i for i in range(1, hosts + 1))]
        ports += [base + 50 + i for i in range(1, hosts + 1)]
        if not any(port_taken(port) for port in ports):
            return base
    raise AssertionError("no free port base between 26300 and 30000")


def lab_env(state: Path, port_base: int) -> dict[str, str]:
    return loopback_env(
        SES_LAB_STATE=str(state),
        SES_LAB_PORT_BASE=str(port_base),
        SES_LAB_CACHE=os.environ.get("SES_LAB_CACHE", "/var/cache/ses-mailer-ops"),
    )


def labctl(env: dict[str, str], *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LABCTL, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def alive(pid: int, start: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] != "Z" and int(fields[19]) == start


def mounts_under(path: Path) -> list[str]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point == str(path) or point.startswith(f"{path}/"):
            found.append(point)
    return found


def assert_nothing_left(state: Path, record: dict[str, Any]) -> None:
    procs = [record["moto"]] + [h[k] for h in record["hosts"] for k in ("nspawn", "imds")]
    survivors = [p["pid"] for p in procs if p and alive(p["pid"], p["start"])]
    assert survivors == [], f"processes left behind: {survivors}"
    assert mounts_under(state) == []
    assert not (state / "hosts").exists()
    assert not (state / "lab.json").exists()
    assert not (state / "hosts.yml").exists()
    for host in record["hosts"]:
        for group in host["cgroups"]:
            assert not Path(group).exists(), f"cgroup left behind: {group}"
    ports = [record["port_base"]]
    ports += [h["ssh_port"] for h in record["hosts"]]
    ports += [int(h["imds_url"].rsplit(":", 1)[1].strip("/")) for h in record["hosts"]]
    for port in ports:
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    state = tmp_path_factory.mktemp("lab") / "state"
    port_base = free_port_base(2)
    env = lab_env(state, port_base)
    started = time.monotonic()
    up = labctl(env, "up", "--hosts", "2", timeout=UP_TIMEOUT)
    record: dict[str, Any] = {}
    try:
        assert up.returncode == 0, f"lab up failed ({up.returncode}): {up.stderr}"
        print(f"lab up took {time.monotonic() - started:.1f} s")
        record = json.loads((state / "lab.json").read_text())
        yield Lab(state, env, record, port_base)
    finally:
        down = labctl(env, "down", timeout=DOWN_TIMEOUT)
        assert down.returncode == 0, f"lab down failed: {down.stderr}"
        if record:
            assert_nothing_left(state, record)


def test_hosts_boot_to_running_systemd(lab: Lab) -> None:
    hosts = lab.record["hosts"]
    assert [(h["name"], h["suite"]) for h in hosts] == [("lab-1", "bookworm"), ("lab-2", "trixie")]
    for host in hosts:
        assert lab.ssh(host, "systemctl is-system-running").strip() == "running"
        assert lab.ssh(host, "hostname").strip() == host["name"]
    ids = {lab.ssh(h, "cat /etc/machine-id").strip() for h in hosts}
    assert len(ids) == 2, "each host has its own machine id"


def test_sshd_listens_on_loopback_only(lab: Lab) -> None:
    for host in lab.record["hosts"]:
        effective = lab.ssh(host, "sshd -T").splitlines()
        assert [line for line in effective if line.startswith("listenaddress ")] == [
            f"listenaddress 127.0.0.1:{host['ssh_port']}"
        ]
        assert "permitrootlogin without-password" in effective
        assert "passwordauthentication no" in effective
        # The hosts share the controller's network namespace: its view is theirs.
        listening = subprocess.run(
            ["ss", "-Hltn", f"sport = :{host['ssh_port']}"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.split()  # fmt: skip
        assert f"127.0.0.1:{host['ssh_port']}" in listening
        assert len([word for word in listening if word.endswith(f":{host['ssh_port']}")]) == 1


def test_aws_endpoints_resolve_to_loopback_inside_hosts(lab: Lab) -> None:
    region = lab.record["region"]
    for host in lab.record["hosts"]:
        for name in (f"sts.{region}.amazonaws.com", "sts.amazonaws.com"):
            assert lab.ssh(host, f"getent hosts {name}").split()[0] == "127.0.0.1"


def test_moto_is_seeded(lab: Lab) -> None:
    ses = lab.aws.client("ses", endpoint_url=lab.moto_url)
    sender = lab.record["sender"]
    attrs = ses.get_identity_verification_attributes(Identities=[sender])
    assert attrs["VerificationAttributes"][sender]["VerificationStatus"] == "Success"
    ec2 = lab.aws.client("ec2", endpoint_url=lab.moto_url)
    for host in lab.record["hosts"]:
        found = ec2.describe_instances(InstanceIds=[host["instance_id"]])["Reservations"]
        instance = found[0]["Instances"][0]
        tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
        assert tags == {"Name": host["name"], "ses-mailer-ops:lab": lab.state.name}
        assert instance["MetadataOptions"]["HttpTokens"] == "required"
        assert "IamInstanceProfile" not in instance
    assert lab.aws.client("iam", endpoint_url=lab.moto_url).list_roles()["Roles"] == []


def test_inventory_matches_the_contract(lab: Lab) -> None:
    inventory = ansible_inventory(lab.state / "hosts.yml")
    assert sorted(inventory["ses_mailers"]["hosts"]) == ["lab-1", "lab-2"]
    for host in lab.record["hosts"]:
        index = host["index"]
        entry = inventory["_meta"]["hostvars"][host["name"]]
        assert entry["ses_aws_endpoint_url"] == f"http://127.0.0.1:{lab.port_base}"
        assert entry["ses_aws_region"] == "us-east-1"
        assert entry["ses_lab_sender"] == "mailer@example.com"
        assert entry["ansible_host"] == "127.0.0.1"
        assert entry["ansible_port"] == host["ssh_port"] == lab.port_base + 10 + index
        assert entry["ansible_user"] == "root"
        assert entry["ansible_ssh_private_key_file"] == str(lab.key)
        assert entry["instance_id"] == host["instance_id"]
        assert entry["ses_mailer_environment"] == {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{lab.port_base}",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{lab.port_base + 50 + index}/",
        }
        assert all(is_loopback_url(url) for url in entry["ses_mailer_environment"].values())


def test_recorded_endpoints_are_loopback(lab: Lab) -> None:
    urls = [lab.record["moto_url"], *(host["imds_url"] for host in lab.record["hosts"])]
    assert urls == [
        f"http://127.0.0.1:{lab.port_base}",
        f"http://127.0.0.1:{lab.port_base + 51}/",
        f"http://127.0.0.1:{lab.port_base + 52}/",
    ]
    assert all(is_loopback_url(url) for url in urls)


def test_env_prints_loopback_exports(lab: Lab) -> None:
    result = labctl(lab.env, "env", timeout=30)
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    exports = dict(line.removeprefix("export ").split("=", 1) for line in lines)
    assert exports["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{lab.port_base}"
    assert exports["AWS_EC2_METADATA_DISABLED"] == "true"
    assert exports["AWS_ACCESS_KEY_ID"] == exports["AWS_SECRET_ACCESS_KEY"] == "testing"
    assert exports["AWS_DEFAULT_REGION"] == "us-east-1"


def test_second_up_on_a_running_lab_fails_with_one_line(lab: Lab) -> None:
    result = labctl(lab.env, "up", timeout=60)
    assert result.returncode == 75
    assert result.stderr.strip().splitlines() == [
        f"labctl: error: a lab is already running in {lab.state}; run `make lab-down` first"
    ]
    status = labctl(lab.env, "status", timeout=30)
    assert status.returncode == 0, "the running lab was left alone"


@pytest.mark.parametrize("index", [0, 1], ids=["bookworm", "trixie"])
def test_host_gets_credentials_of_the_associated_role_only(lab: Lab, index: int) -> None:
    host = lab.record["hosts"][index]
    lab.ssh(
        host,
        "apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
        "apt-get install -y -qq python3-boto3 >/dev/null",
        timeout=APT_TIMEOUT,
    )
    lab.ssh(host, f"cat > /root/whoami.py <<'EOF'\n{WHOAMI}EOF")
    run_whoami = (
        f"AWS_ENDPOINT_URL={lab.record['moto_url']} "
        f"AWS_EC2_METADATA_SERVICE_ENDPOINT={host['imds_url']} "
        f"AWS_DEFAULT_REGION={lab.record['region']} python3 /root/whoami.py"
    )
    assert lab.ssh(host, run_whoami).strip() == "NO-CREDENTIALS"

    iam = lab.aws.client("iam", endpoint_url=lab.moto_url)
    ec2 = lab.aws.client("ec2", endpoint_url=lab.moto_url)
    role = f"lab-test-{uuid.uuid4().hex[:8]}"
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "ec2.amazonaws.com"},
                "Action": "sts:AssumeRole",
            }
        ],
    }
    iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(trust))
    iam.create_instance_profile(InstanceProfileName=f"{role}-profile")
    iam.add_role_to_instance_profile(InstanceProfileName=f"{role}-profile", RoleName=role)
    ec2.associate_iam_instance_profile(
        IamInstanceProfile={"Name": f"{role}-profile"}, InstanceId=host["instance_id"]
    )
    arn = lab.ssh(host, run_whoami).strip()
    assert arn == (
        f"arn:aws:sts::{lab.record['account_id']}:assumed-role/{role}/{host['instance_id']}"
    )
    # The other host's metadata does not offer this role: credentials are per instance.
    other = lab.record["hosts"][1 - index]
    assert imds_roles(other["imds_url"]) != [role]


def imds_roles(imds_url: str) -> list[str]:
    """Role names the metadata server offers (empty when it answers 404)."""
    token_request = urllib.request.Request(  # noqa: S310 (a loopback URL from lab.json)
        f"{imds_url}latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
    )
    with urllib.request.urlopen(token_request, timeout=10) as response:  # noqa: S310 (loopback)
        token = response.read().decode()
    request = urllib.request.Request(  # noqa: S310 (a loopback URL from lab.json)
        f"{imds_url}latest/meta-data/iam/security-credentials/",
        headers={"X-aws-ec2-metadata-token": token},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
            roles: list[str] = response.read().decode().split()
            return roles
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
        return []


def test_moto_only_lab_and_port_in_use(tmp_path: Path) -> None:
    state = tmp_path / "small"
    small_base = free_port_base(0)
    env = lab_env(state, small_base)
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", small_base))
        blocker.listen(1)
        refused = labctl(env, "up", "--hosts", "0", timeout=60)
    assert refused.returncode == 69
    assert refused.stderr.splitlines() == [
        f"labctl: error: port 127.0.0.1:{small_base} is in use; "
        "stop its user or set SES_LAB_PORT_BASE"
    ]
    assert not (state / "lab.json").exists()

    up = labctl(env, "up", "--hosts", "0", timeout=120)
    record: dict[str, Any] = {}
    try:
        assert up.returncode == 0, up.stderr
        record = json.loads((state / "lab.json").read_text())
        assert record["hosts"] == []
        inventory = ansible_inventory(state / "hosts.yml")
        assert inventory["_meta"]["hostvars"] == {}
        assert inventory["all"]["children"] == ["ungrouped", "ses_mailers"]
        ses = moto_session("us-east-1").client("ses", endpoint_url=record["moto_url"])
        assert ses.list_identities()["Identities"] == ["mailer@example.com"]
    finally:
        down = labctl(env, "down", timeout=DOWN_TIMEOUT)
    assert down.returncode == 0, down.stderr
    if record:
        assert_nothing_left(state, record)
    again = labctl(env, "down", timeout=30)
    assert again.returncode == 0 and again.stderr == ""
    assert "nothing to stop" in again.stdout
