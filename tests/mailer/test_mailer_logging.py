"""C10: every line on stderr, in order, with a syslog priority the journal keeps."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.mailer.mailerlab import (
    SENDER,
    FaultServer,
    Reply,
    mailer_env,
    run_mailer,
    stderr_identity,
    write_job,
)

EX_NOPERM = 77
DENIAL = "not authorized to perform: ses:SendEmail"


def job(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "digest",
        "from": SENDER,
        "to": ["a@example.com", "b@example.com", "c@example.com"],
        "subject": "Digest",
        "text": "${output}",
        "region": "us-east-1",
        "command": {"argv": ["/bin/sh", "-c", "echo partial; exit 2"]},
        "per_recipient": {"max_rate": 100, "concurrency": 1},
    }
    base.update(over)
    return base


EXPECTED = [
    ("<6>", "info: no state directory: a restarted run may send its messages again"),
    ("<6>", "info: running command: /bin/sh -c 'echo partial; exit 2'"),
    ("<4>", "warning: command finished: exit status 2, 8 bytes of output"),
    ("<6>", "info: job digest: sending 3 message(s) from ops@example.com via SES in us-east-1"),
    ("<6>", "info: per-recipient mode: 3 message(s) at most 100/s, 1 at once"),
    ("<6>", "info: message to a@example.com accepted by SES: MessageId fault-0001"),
    ("<6>", "info: message to b@example.com accepted by SES: MessageId fault-0002"),
    (
        "<3>",
        "error: access denied for ses:SendEmail in us-east-1 (sender ops@example.com): "
        "the instance profile's role policy must allow ses:SendEmail",
    ),
]


def run_failing(
    tmp_path: Path, home: Path, fault: FaultServer, *, journal: bool, debug: bool = False
) -> tuple[int, list[str]]:
    """Command mode, 3 recipients: two accepted, the third denied.

    With ``journal`` the child's stderr is the file JOURNAL_STREAM names, as
    systemd arranges it; otherwise JOURNAL_STREAM names some other file.
    """
    fault.then(Reply(), Reply(), default=Reply(403, "AccessDeniedException", DENIAL))
    path = write_job(tmp_path, job())
    stderr_file = tmp_path / "stderr"
    stderr_file.touch()
    stream = stderr_identity(stderr_file) if journal else stderr_identity(path)
    result = run_mailer(
        path,
        "--debug" if debug else "--log-level=info",
        env=mailer_env(fault.url, home, JOURNAL_STREAM=stream),
        stderr_file=stderr_file,
    )
    return result.code, result.lines


def test_c10_journal_priorities_in_order(tmp_path: Path, home: Path, fault: FaultServer) -> None:
    code, lines = run_failing(tmp_path, home, fault, journal=True)
    assert code == EX_NOPERM
    assert lines == [prefix + text for prefix, text in EXPECTED]


def test_c10_no_prefix_when_stderr_is_not_the_journal(
    tmp_path: Path, home: Path, fault: FaultServer
) -> None:
    """JOURNAL_STREAM inherited but stderr redirected elsewhere: plain lines."""
    code, lines = run_failing(tmp_path, home, fault, journal=False)
    assert code == EX_NOPERM
    assert lines
    assert not any(line.startswith("<") for line in lines)
    assert lines[-1].startswith("error: access denied for ses:SendEmail in us-east-1")


def test_c10_debug_traceback_keeps_the_prefix_on_every_line(
    tmp_path: Path, home: Path, fault: FaultServer
) -> None:
    code, lines = run_failing(tmp_path, home, fault, journal=True, debug=True)
    assert code == EX_NOPERM
    error = next(i for i, line in enumerate(lines) if line.startswith("<3>error: "))
    tail = lines[error + 1 :]
    assert tail[0] == "<7>debug: traceback:"
    assert "<7>Traceback (most recent call last):" in tail
    assert all(line.startswith("<7>") for line in tail)
    assert all(re.match(r"<[0-7]>", line) for line in lines)
