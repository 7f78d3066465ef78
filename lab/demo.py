#!/usr/bin/env python3
"""Show the whole ses-mailer-ops chain on the lab, in one command (`make demo`).

1. start the lab: moto as the AWS account, two Debian hosts with systemd, one
   fake IMDSv2 per host, all on loopback;
2. run ``playbooks/site.yml`` against it exactly as an operator would against
   AWS (only the inventory differs);
3. trigger one job with ``playbooks/send-now.yml``;
4. read back what was created and the mail that arrived, and the identity the
   host's credentials belong to;
5. stop the lab (``--keep`` leaves it running and says how to stop it).

Exit status 0 only if the mail really arrived. Everything talks to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import boto3

REPO = Path(__file__).resolve().parent.parent
LABCTL = REPO / "lab" / "labctl.py"
VENV_BIN = Path(sys.executable).parent
JOB = "daily-report"
DUMMY_KEY = "testing"  # moto accepts any key; never a real one


class DemoError(Exception):
    """A step of the demo failed; the message says which."""


def say(text: str = "") -> None:
    """Print one line of the account, at once."""
    print(text, flush=True)


def step(number: int, text: str) -> None:
    """Print a step heading."""
    say(f"\n[{number}/5] {text}")


def lab_env(state: Path, port_base: int) -> dict[str, str]:
    """Environment for labctl and ansible: loopback endpoints, dummy keys."""
    env = dict(os.environ)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        env.pop(name, None)
    env.update(
        {
            "SES_LAB_STATE": str(state),
            "SES_LAB_PORT_BASE": str(port_base),
            "AWS_ACCESS_KEY_ID": DUMMY_KEY,
            "AWS_SECRET_ACCESS_KEY": DUMMY_KEY,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/nonexistent/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
            "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
            "ANSIBLE_NOCOLOR": "1",
            "PATH": f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        }
    )
    return env


def run_logged(argv: Sequence[str], env: Mapping[str, str], log: Path, what: str) -> str:
    """Run a command with its output in a log file; fail naming the log."""
    with log.open("w", encoding="utf-8") as out:
        done = subprocess.run(
            list(argv), env=dict(env), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=False
        )
    text = log.read_text(encoding="utf-8", errors="replace")
    if done.returncode != 0:
        tail = "\n".join(text.splitlines()[-25:])
        raise DemoError(f"{what} failed (exit {done.returncode}); full log: {log}\n{tail}")
    return text


def recap(text: str) -> list[str]:
    """Return the PLAY RECAP lines of an ansible-playbook output."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("PLAY RECAP"):
            return [entry.strip() for entry in lines[index + 1 :] if entry.strip()]
    return []


def make_inventory(state: Path) -> Path:
    """The lab's hosts plus the operator-style variables of inventory/lab."""
    inventory = state / "inventory"
    inventory.mkdir(exist_ok=True)
    shutil.copyfile(state / "hosts.yml", inventory / "hosts.yml")
    link = inventory / "group_vars"
    if not link.is_symlink():
        link.symlink_to(REPO / "inventory" / "lab" / "group_vars")
    return inventory


def client_args(lab: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments for boto3 clients of the lab's moto."""
    return {
        "endpoint_url": lab["moto_url"],
        "region_name": lab["region"],
        "aws_access_key_id": DUMMY_KEY,
        "aws_secret_access_key": DUMMY_KEY,
    }


def sent_messages(moto_url: str) -> list[dict[str, Any]]:
    """SES messages moto received, read through its data API."""
    if not moto_url.startswith("http://127."):
        raise DemoError(f"refusing to read from {moto_url}: the lab is on loopback only")
    url = f"{moto_url}/moto-api/data.json"
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback, checked)
        data = json.load(response)
    ses = data.get("ses", {})
    return [*ses.get("RawMessage", []), *ses.get("Message", [])]


def show_aws_side(lab: Mapping[str, Any]) -> None:
    """Print the role, profile, policy and the association per instance."""
    iam = boto3.client("iam", **client_args(lab))
    ec2 = boto3.client("ec2", **client_args(lab))
    for profile in iam.list_instance_profiles()["InstanceProfiles"]:
        roles = ", ".join(role["RoleName"] for role in profile["Roles"]) or "no role"
        say(f"  instance profile {profile['InstanceProfileName']} -> role {roles}")
        for role in profile["Roles"]:
            attached = iam.list_attached_role_policies(RoleName=role["RoleName"])
            for policy in attached["AttachedPolicies"]:
                say(f"    policy {policy['PolicyName']} ({policy['PolicyArn']})")
                meta = iam.get_policy(PolicyArn=policy["PolicyArn"])["Policy"]
                version = iam.get_policy_version(
                    PolicyArn=policy["PolicyArn"], VersionId=meta["DefaultVersionId"]
                )["PolicyVersion"]["Document"]
                doc = json.loads(version) if isinstance(version, str) else version
                for statement in doc.get("Statement", []):
                    actions = statement.get("Action")
                    say(f"      allows {actions} on {statement.get('Resource')}")
    associations = ec2.describe_iam_instance_profile_associations()[
        "IamInstanceProfileAssociations"
    ]
    by_instance = {
        item["InstanceId"]: item for item in associations if item["State"] == "associated"
    }
    for host in lab["hosts"]:
        instance = ec2.describe_instances(InstanceIds=[host["instance_id"]])
        options = instance["Reservations"][0]["Instances"][0].get("MetadataOptions", {})
        profile_arn = (
            by_instance.get(host["instance_id"], {}).get("IamInstanceProfile", {}).get("Arn")
        )
        say(
            f"  {host['name']} ({host['instance_id']}, Debian {host['suite']}): "
            f"profile {profile_arn or 'NONE'}, IMDSv2 tokens {options.get('HttpTokens')}"
        )


def ssh(lab: Mapping[str, Any], host: Mapping[str, Any], key: Path, command: str) -> str:
    """Run a command on a lab host over SSH and return its output."""
    argv = [
        "ssh", "-i", str(key), "-p", str(host["ssh_port"]),
        "-o", "UserKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=no",
        "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
        "root@127.0.0.1", command,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    return (done.stdout + done.stderr).strip()


def show_host_side(lab: Mapping[str, Any], state: Path) -> None:
    """Print the identity the host's credentials belong to and the job's journal."""
    host = lab["hosts"][0]
    key = state / "id_ed25519"
    env = f"AWS_ENDPOINT_URL={lab['moto_url']} AWS_EC2_METADATA_SERVICE_ENDPOINT={host['imds_url']}"
    probe = (
        f"runuser -u ses-mailer -- env -i {env} AWS_DEFAULT_REGION={lab['region']} "
        '/usr/bin/python3 -c "import boto3; s=boto3.Session(); '
        f"sts=s.client('sts', endpoint_url='{lab['moto_url']}'); "
        "print(s.get_credentials().method, sts.get_caller_identity()['Arn'])\""
    )
    say(f"  credentials on {host['name']}, as the service user: {ssh(lab, host, key, probe)}")
    keys = ssh(
        lab, host, key,
        # An access key id, or a credentials-file line with a value; Ansible's
        # own module files (which carry this pattern) are left out.
        "grep -rlIE --exclude-dir=.ansible '(AKIA|ASIA)[0-9A-Z]{16}|"
        "^[[:space:]]*aws_(secret_access_key|session_token)[[:space:]]*=[[:space:]]*[^[:space:]]' "
        "/etc /root /var/lib /usr/local /home 2>/dev/null | head -3; ls /root/.aws 2>/dev/null",
    )  # fmt: skip
    found = keys or "none (no key file, no key in /etc, /root, /var/lib, /usr/local)"
    say(f"  AWS key material on {host['name']}: {found}")
    journal = ssh(lab, host, key, f"journalctl -u {JOB}.service -o cat --no-pager | tail -n 6")
    say(f"  journal of {JOB}.service on {host['name']}:")
    for line in journal.splitlines():
        say(f"    {line}")


def show_mail(lab: Mapping[str, Any], before: int) -> bool:
    """Print the mail that arrived; True if the demo job's mail is there."""
    messages = sent_messages(lab["moto_url"])[before:]
    found = False
    for item in messages:
        raw = item.get("raw_data") or ""
        parsed = email.message_from_string(raw, policy=email.policy.default) if raw else None
        subject = str(parsed["Subject"]) if parsed else item.get("subject", "")
        sender = str(parsed["From"]) if parsed else item.get("source", "")
        envelope = sorted(set(item.get("destinations") or []))
        to = str(parsed["To"]) if parsed and parsed["To"] else ", ".join(envelope)
        say(f"  from:    {sender}")
        say(f"  to:      {to}")
        say(f"  subject: {subject}")
        body = ""
        if isinstance(parsed, EmailMessage):
            part = parsed.get_body(preferencelist=("plain",))
            body = part.get_content() if part is not None else ""
        for line in body.strip().splitlines()[:3]:
            say(f"  | {line}")
        found = found or subject.startswith("Daily report from")
    return found


def demo(state: Path, port_base: int, keep: bool) -> int:
    """Run the five steps; return the exit status."""
    env = lab_env(state, port_base)
    logs = state / "demo-logs"
    started = time.monotonic()
    step(1, "Starting the lab (moto, 2 Debian hosts with systemd, fake IMDSv2 per host)")
    up = subprocess.run([sys.executable, str(LABCTL), "up", "--hosts", "2"], env=env, check=False)
    if up.returncode != 0:
        raise DemoError("the lab did not start (see above); `make lab-down` or --state cleans up")
    try:
        logs.mkdir(exist_ok=True)
        lab = json.loads((state / "lab.json").read_text(encoding="utf-8"))
        inventory = make_inventory(state)
        step(2, "ansible-playbook playbooks/site.yml  (as against AWS; only the inventory differs)")
        output = run_logged(
            [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), "playbooks/site.yml"],
            env, logs / "site.log", "site.yml",
        )  # fmt: skip
        for line in recap(output):
            say(f"  {line}")
        step(
            3, f"ansible-playbook playbooks/send-now.yml -e ses_mailer_send_now={JOB} --limit lab-1"
        )
        before = len(sent_messages(lab["moto_url"]))
        run_logged(
            [
                str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), "playbooks/send-now.yml",
                "-e", f"ses_mailer_send_now={JOB}", "--limit", lab["hosts"][0]["name"],
            ],
            env, logs / "send-now.log", "send-now.yml",
        )  # fmt: skip
        step(4, "What the account and the hosts look like now")
        show_aws_side(lab)
        show_host_side(lab, state)
        say("\n  The mail that reached SES (read back from the emulator):")
        arrived = show_mail(lab, before)
        step(5, "Result")
        if not arrived:
            say("  FAILED: the demo job's mail did not arrive")
            return 1
        say(f"  OK: the mail arrived, sent with the instance role's temporary credentials "
            f"({time.monotonic() - started:.0f} s in all)")  # fmt: skip
        return 0
    finally:
        if keep:
            say(f"\nThe lab keeps running. Inventory: {state}/inventory ; stop it with:\n"
                f"  SES_LAB_STATE={state} SES_LAB_PORT_BASE={port_base} make lab-down")  # fmt: skip
        else:
            say("\nStopping the lab ...")
            subprocess.run([sys.executable, str(LABCTL), "down"], env=env, check=False)


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the demo, turn failures into one message."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the lab running afterwards")
    parser.add_argument(
        "--state",
        type=Path,
        default=REPO / ".lab" / "demo",
        help="lab state dir (default .lab/demo)",
    )
    parser.add_argument(
        "--port-base",
        type=int,
        default=24900,
        help="first loopback port of the lab (default 24900)",
    )
    args = parser.parse_args(argv)
    try:
        return demo(args.state.resolve(), args.port_base, args.keep)
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
