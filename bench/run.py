#!/usr/bin/env python3
"""Benchmarks for ses-mailer-ops, kept apart from the tests.

Two measurements, each taken side by side in one run (the variants are
interleaved round by round, so a noisy neighbour slows them alike) and
reported as medians and ratios:

1. ``mailer``: one real send of the mail program (``files/ses_mailer.py``)
   against the same send with the AWS CLI v1 (``aws sesv2 send-email``), both
   as fresh processes talking to moto on loopback, as a systemd timer would
   start them.
2. ``ansible``: a small playbook on lab hosts with the fleet settings of
   ``ansible.cfg`` (pipelining, SSH multiplexing) turned off, one at a time
   and all on.

Everything talks to 127.0.0.1 only; the loops are bounded by ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
MAILER = REPO / "files" / "ses_mailer.py"
LABCTL = REPO / "lab" / "labctl.py"
PLAYBOOK = REPO / "bench" / "fleet.yml"
SENDER = "bench@example.com"
REGION = "us-east-1"
DUMMY_KEY = "testing"  # moto accepts any key; never a real one


def free_port() -> int:
    """Return a free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def base_env(extra: Mapping[str, str]) -> dict[str, str]:
    """Return a child environment that can reach loopback only."""
    env = {
        "PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "AWS_ACCESS_KEY_ID": DUMMY_KEY,
        "AWS_SECRET_ACCESS_KEY": DUMMY_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    }
    env.update(extra)
    return env


def timed(argv: Sequence[str], env: Mapping[str, str]) -> float:
    """Run a command to completion and return its wall time in seconds."""
    start = time.perf_counter()
    done = subprocess.run(argv, env=dict(env), capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(
            f"bench: {argv[0]} exited {done.returncode}: {done.stderr.strip()[-300:]}"
        )
    return elapsed


def report(title: str, samples: Mapping[str, list[float]], baseline: str) -> None:
    """Print medians and the ratio of each variant to the baseline."""
    base = statistics.median(samples[baseline])
    print(f"\n{title}")
    print(f"  {'variant':<34} {'median s':>9} {'min s':>8} {'ratio':>7}")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"  {name:<34} {median:9.3f} {min(values):8.3f} {median / base:7.2f}")
    print(f"  (ratio = median / median of '{baseline}'; {len(samples[baseline])} rounds)")


def bench_mailer(rounds: int) -> None:
    """Time the mail program against the AWS CLI, one send each per round."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        ses = boto3.client(
            "ses",
            region_name=REGION,
            endpoint_url=endpoint,
            aws_access_key_id=DUMMY_KEY,
            aws_secret_access_key=DUMMY_KEY,
        )
        ses.verify_email_identity(EmailAddress=SENDER)
        env = base_env({"AWS_ENDPOINT_URL": endpoint})
        with tempfile.TemporaryDirectory(prefix="ses-bench-") as tmp:
            job = Path(tmp, "bench.json")
            job.write_text(
                json.dumps(
                    {
                        "name": "bench",
                        "from": f"Bench <{SENDER}>",
                        "to": ["ops@example.com"],
                        "subject": "bench",
                        "text": "hello from the benchmark",
                        "region": REGION,
                    }
                ),
                encoding="utf-8",
            )
            mailer = [sys.executable, str(MAILER), "--job", str(job), "--quiet"]
            awscli = [
                str(VENV_BIN / "aws"),
                "sesv2",
                "send-email",
                "--from-email-address",
                SENDER,
                "--destination",
                "ToAddresses=ops@example.com",
                "--content",
                "Simple={Subject={Data=bench},Body={Text={Data=hello from the benchmark}}}",
            ]
            dry = [*mailer, "--dry-run"]
            samples: dict[str, list[float]] = {
                "awscli v1: aws sesv2 send-email": [],
                "ses_mailer.py send": [],
                "ses_mailer.py --dry-run": [],
            }
            timed(mailer, env)  # warm the page cache for both
            timed(awscli, env)
            for _ in range(rounds):
                samples["awscli v1: aws sesv2 send-email"].append(timed(awscli, env))
                samples["ses_mailer.py send"].append(timed(mailer, env))
                samples["ses_mailer.py --dry-run"].append(timed(dry, env))
        report(
            "One send as a fresh process, against moto on loopback",
            samples,
            "awscli v1: aws sesv2 send-email",
        )
    finally:
        server.stop()


def bench_ansible(rounds: int, hosts: int) -> None:
    """Time a small playbook on lab hosts with the fleet settings on and off."""
    state = REPO / ".lab" / "bench"
    lab_env = dict(os.environ)
    lab_env.update(
        {
            "SES_LAB_STATE": str(state),
            "SES_LAB_PORT_BASE": "25100",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    up = subprocess.run(
        [sys.executable, str(LABCTL), "up", "--hosts", str(hosts)], env=lab_env, check=False
    )
    if up.returncode != 0:
        raise SystemExit("bench: the lab did not start (see above)")
    try:
        inventory = state / "hosts.yml"
        common = {
            "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
            "ANSIBLE_INVENTORY": str(inventory),
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_CONTROL_PATH_DIR": str(state / "cp"),
        }
        no_mux = "-o ControlMaster=no -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no"
        variants: dict[str, dict[str, str]] = {
            "ansible.cfg as shipped": {},
            "without pipelining": {"ANSIBLE_PIPELINING": "False"},
            "without SSH multiplexing": {"ANSIBLE_SSH_ARGS": no_mux},
            "neither (ansible defaults)": {
                "ANSIBLE_PIPELINING": "False",
                "ANSIBLE_SSH_ARGS": no_mux,
            },
            "forks=1 (serial hosts)": {"ANSIBLE_FORKS": "1"},
        }
        playbook = [str(VENV_BIN / "ansible-playbook"), str(PLAYBOOK)]
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, extra in variants.items():
                shutil.rmtree(state / "cp", ignore_errors=True)
                env = base_env({**common, **extra})
                samples[name].append(timed(playbook, env))
        report(
            f"bench/fleet.yml (10 tasks) on {hosts} lab hosts over SSH",
            samples,
            "ansible.cfg as shipped",
        )
    finally:
        subprocess.run([sys.executable, str(LABCTL), "down"], env=lab_env, check=False)


def main() -> int:
    """Parse the options and run the chosen benchmarks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", choices=("mailer", "ansible"), help="run one benchmark instead of both"
    )
    parser.add_argument(
        "--rounds", type=int, default=7, help="interleaved rounds per variant (1..50, default 7)"
    )
    parser.add_argument(
        "--hosts", type=int, default=2, help="lab hosts for the ansible benchmark (default 2)"
    )
    args = parser.parse_args()
    if not 1 <= args.rounds <= 50:
        parser.error("--rounds must be between 1 and 50")
    if args.only in (None, "mailer"):
        bench_mailer(args.rounds)
    if args.only in (None, "ansible"):
        bench_ansible(min(args.rounds, 5), args.hosts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
