"""labctl's command line: knobs are checked, expected errors are one line with a named code.

These cases start nothing: each runs labctl as a subprocess against a state dir
of its own under pytest's tmp and asserts exit status, stdout and stderr.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.safety import loopback_env

REPO = Path(__file__).resolve().parents[2]
LABCTL = [sys.executable, str(REPO / "lab" / "labctl.py")]
EX_USAGE, EX_UNAVAILABLE, ARGPARSE_USAGE = 64, 69, 2


def labctl(tmp_path: Path, *args: str, **knobs: str) -> subprocess.CompletedProcess[str]:
    env = loopback_env()
    env.update(SES_LAB_STATE=str(tmp_path / "state"), SES_LAB_PORT_BASE="26900")
    env.update(knobs)
    return subprocess.run(
        [*LABCTL, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("knob", "value", "message"),
    [
        ("SES_LAB_PORT_BASE", "abc", "SES_LAB_PORT_BASE must be a number, not 'abc'"),
        ("SES_LAB_PORT_BASE", "80", "SES_LAB_PORT_BASE 80 is outside 1024..65435"),
        ("SES_LAB_REGION", "mars", "SES_LAB_REGION 'mars' does not look like a region"),
        ("SES_LAB_SENDER", "nobody", "SES_LAB_SENDER 'nobody' is not an e-mail address"),
    ],
    ids=["port-not-a-number", "port-privileged", "bad-region", "bad-sender"],
)
def test_bad_knob_is_a_usage_error(tmp_path: Path, knob: str, value: str, message: str) -> None:
    result = labctl(tmp_path, "up", **{knob: value})
    assert result.returncode == EX_USAGE
    assert result.stderr.splitlines() == [f"labctl: error: {message}"]
    assert result.stdout == ""
    assert not (tmp_path / "state").exists(), "nothing was started or written"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["up", "--hosts", "40"], "--hosts must be between 0 and 39"),
        (["up", "--hosts", "-1"], "--hosts must be between 0 and 39"),
        (["up", "--suites", "jessie"], "--suites takes bookworm, trixie"),
    ],
    ids=["too-many-hosts", "negative-hosts", "unknown-suite"],
)
def test_bad_option_is_refused_by_the_parser(tmp_path: Path, args: list[str], message: str) -> None:
    result = labctl(tmp_path, *args)
    assert result.returncode == ARGPARSE_USAGE
    assert result.stderr.splitlines()[-1].endswith(f"error: {message}")
    assert not (tmp_path / "state").exists()


def test_down_without_a_lab_is_a_no_op(tmp_path: Path) -> None:
    result = labctl(tmp_path, "down")
    assert result.returncode == 0
    assert result.stderr == ""
    assert result.stdout == f"lab: no lab recorded in {tmp_path / 'state'}; nothing to stop\n"


def test_env_without_a_lab_is_an_error(tmp_path: Path) -> None:
    result = labctl(tmp_path, "env")
    assert result.returncode == EX_UNAVAILABLE
    assert result.stderr.splitlines() == [
        f"labctl: error: no lab in {tmp_path / 'state'}; run `make lab-up` first"
    ]
    assert result.stdout == ""


def test_status_without_a_lab_says_so(tmp_path: Path) -> None:
    result = labctl(tmp_path, "status")
    assert result.returncode == EX_UNAVAILABLE
    assert result.stdout == f"no lab in {tmp_path / 'state'}\n"
