"""Helpers for the AWS-side tests: run the playbooks against moto, read moto back."""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3

from lab.awsproxy import AwsProxy, Call
from tests.safety import loopback_env

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = REPO / ".venv" / "bin" / "ansible-playbook"
MOTO_SERVER = REPO / ".venv" / "bin" / "moto_server"
REGION = "us-east-1"
SENDER = "mailer@example.com"

# Calls that change something. An unchanged run must make none of them.
MUTATING = re.compile(
    r"^(Create|Update|Put|Attach|Detach|Delete|Add|Remove|Associate|Disassociate|Replace|"
    r"Modify|Tag|Untag|Set|RunInstances|POST /v2/email/identities$)"
)
_RECAP = re.compile(
    r"^localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=\d+\s+failed=(\d+)", re.M
)


def policy_plugin() -> ModuleType:
    """The ses_iam filter plugin module, loaded from the role."""
    path = REPO / "roles" / "ses_iam" / "filter_plugins" / "ses_iam_policy.py"
    spec = importlib.util.spec_from_file_location("ses_iam_policy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Run:
    """Outcome of one ansible-playbook run."""

    rc: int
    stdout: str
    stderr: str
    seconds: float
    calls: list[Call] = field(default_factory=list)

    @property
    def changed(self) -> int:
        match = _RECAP.search(self.stdout)
        assert match, f"no play recap in output:\n{self.stdout}\n{self.stderr}"
        return int(match.group(2))

    @property
    def failed(self) -> int:
        match = _RECAP.search(self.stdout)
        assert match, f"no play recap in output:\n{self.stdout}\n{self.stderr}"
        return int(match.group(3))

    def actions(self) -> list[str]:
        return [c.action for c in self.calls]

    def mutating(self) -> list[str]:
        return [c.action for c in self.calls if MUTATING.match(c.action)]

    def explain(self) -> str:
        return f"rc={self.rc}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


@dataclass
class AwsLab:
    """One test's view of the emulator: names from a prefix, playbook runner, clients."""

    moto_url: str
    proxy: AwsProxy
    prefix: str
    workdir: Path

    def client(self, service: str) -> Any:
        """A boto3 client talking to moto directly (not recorded by the proxy)."""
        # Credentials: the dummy ones the root conftest put in the environment.
        factory: Any = boto3.client
        return factory(service, endpoint_url=self.moto_url, region_name=REGION)

    @property
    def role(self) -> str:
        return f"{self.prefix}-role"

    @property
    def policy(self) -> str:
        return f"{self.prefix}-send"

    def base_vars(self) -> dict[str, Any]:
        return {
            "ses_iam_role_name": self.role,
            "ses_iam_policy_name": self.policy,
            "ses_iam_sender_addresses": [SENDER],
            "ses_iam_sandbox": "production",
            "ses_instance_attach_delay": 0.2,
            "ses_aws_instance_filters": {"tag:ses-test": self.prefix},
        }

    def verify_sender(self) -> None:
        self.client("ses").verify_email_identity(EmailAddress=SENDER)

    def make_instances(self, count: int = 1) -> list[str]:
        answer = self.client("ec2").run_instances(
            ImageId="ami-12c6146b",
            MinCount=count,
            MaxCount=count,
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": [{"Key": "ses-test", "Value": self.prefix}]}
            ],
        )
        return [i["InstanceId"] for i in answer["Instances"]]

    def playbook(
        self,
        name: str,
        extra: dict[str, Any] | None = None,
        *,
        check: bool = False,
        tags: str = "",
        mailers: dict[str, str] | None = None,
    ) -> Run:
        """Run playbooks/<name> through the proxy; the calls it made are in Run.calls."""
        variables = {**self.base_vars(), **(extra or {})}
        vars_file = self.workdir / f"vars-{time.monotonic_ns()}.json"
        vars_file.write_text(json.dumps(variables))
        inventory = {
            "all": {
                "vars": {"ses_aws_endpoint_url": self.proxy.url, "ses_aws_region": REGION},
                "children": {
                    "ses_mailers": {
                        "hosts": {h: {"instance_id": i} for h, i in (mailers or {}).items()}
                    }
                },
            }
        }
        inventory_file = self.workdir / "hosts.json"
        inventory_file.write_text(json.dumps(inventory))
        command = [str(ANSIBLE_PLAYBOOK), "-i", str(inventory_file), str(REPO / "playbooks" / name)]
        command += ["-e", f"@{vars_file}"]
        if check:
            command += ["--check", "--diff"]
        if tags:
            command += ["--tags", tags]
        env = loopback_env(
            self.proxy.url,
            home=self.workdir,
            ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_DEPRECATION_WARNINGS="false",
            ANSIBLE_LOCAL_TEMP=str(self.workdir / "ansible-tmp"),
        )
        self.proxy.take_calls()
        started = time.monotonic()
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        seconds = time.monotonic() - started
        return Run(done.returncode, done.stdout, done.stderr, seconds, self.proxy.take_calls())

    # --- reading moto back -------------------------------------------------

    def account(self) -> str:
        account: str = self.client("sts").get_caller_identity()["Account"]
        return account

    def policy_arn(self, name: str | None = None) -> str:
        return f"arn:aws:iam::{self.account()}:policy/{name or self.policy}"

    def profile_arn(self, name: str | None = None) -> str:
        return f"arn:aws:iam::{self.account()}:instance-profile/{name or self.role}"

    def iam_names(self) -> dict[str, list[str]]:
        """Roles, profiles and local policies whose names start with the prefix."""
        iam = self.client("iam")
        return {
            "roles": [r["RoleName"] for r in iam.list_roles()["Roles"]
                      if r["RoleName"].startswith(self.prefix)],
            "profiles": [p["InstanceProfileName"]
                         for p in iam.list_instance_profiles()["InstanceProfiles"]
                         if p["InstanceProfileName"].startswith(self.prefix)],
            "policies": [p["PolicyName"] for p in iam.list_policies(Scope="Local")["Policies"]
                         if p["PolicyName"].startswith(self.prefix)],
        }

    def associations(self, instance_ids: list[str]) -> dict[str, str]:
        """Instance id -> associated profile ARN (associated state only)."""
        answer = self.client("ec2").describe_iam_instance_profile_associations(
            Filters=[{"Name": "instance-id", "Values": instance_ids}]
        )
        return {
            a["InstanceId"]: a["IamInstanceProfile"]["Arn"]
            for a in answer["IamInstanceProfileAssociations"]
            if a["State"] == "associated"
        }

    def attached(self, role: str) -> list[str]:
        answer = self.client("iam").list_attached_role_policies(RoleName=role)
        return sorted(p["PolicyArn"] for p in answer["AttachedPolicies"])

    def metadata_options(self, instance_id: str) -> dict[str, Any]:
        answer = self.client("ec2").describe_instances(InstanceIds=[instance_id])
        options: dict[str, Any] = answer["Reservations"][0]["Instances"][0]["MetadataOptions"]
        return {k: v for k, v in options.items() if k != "State"}

    def make_legacy(self, instance_id: str) -> tuple[str, str, str]:
        """A legacy profile with its own role and policy, associated with the instance."""
        iam = self.client("iam")
        role, profile = f"{self.prefix}-legacy-role", f"{self.prefix}-legacy-profile"
        trust = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                           "Action": "sts:AssumeRole"}],
        }
        iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(trust))
        own = iam.create_policy(
            PolicyName=f"{self.prefix}-legacy-own",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::legacy",
            }]}),
        )["Policy"]["Arn"]
        iam.attach_role_policy(RoleName=role, PolicyArn=own)
        arn = iam.create_instance_profile(InstanceProfileName=profile)["InstanceProfile"]["Arn"]
        iam.add_role_to_instance_profile(InstanceProfileName=profile, RoleName=role)
        self.client("ec2").associate_iam_instance_profile(
            IamInstanceProfile={"Arn": arn}, InstanceId=instance_id
        )
        return role, arn, own


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextmanager
def moto_process(workdir: Path) -> Iterator[str]:
    """A moto_server of its own on loopback (separate state, runs beside the others)."""
    port = _free_port()
    with (workdir / "moto.log").open("w") as log:
        process = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
            env=loopback_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server on port {port} did not start: see {workdir}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


@contextmanager
def aws_lab(prefix: str, workdir: Path) -> Iterator[AwsLab]:
    """moto of its own, the recording proxy in front of it, names from ``prefix``."""
    with moto_process(workdir) as moto_url:
        proxy = AwsProxy(moto_url).start()
        try:
            yield AwsLab(moto_url=moto_url, proxy=proxy, prefix=prefix, workdir=workdir)
        finally:
            proxy.stop()
