"""Exactly once per scheduled run: a restarted run sends only what is left."""

from __future__ import annotations

import hashlib
import json
import signal
import time
from pathlib import Path
from typing import Any

from tests.mailer.mailerlab import (
    SENDER,
    FaultServer,
    Moto,
    Reply,
    mailer_env,
    run_mailer,
    start_mailer,
    write_job,
)

EX_TEMPFAIL = 75
RECIPIENTS = [f"p{i:03d}@example.com" for i in range(10)]


def job(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "newsletter",
        "from": SENDER,
        "to": RECIPIENTS,
        "subject": "News for ${recipient}",
        "text": "Hello\n",
        "region": "us-east-1",
        "per_recipient": {"max_rate": 200, "concurrency": 1},
    }
    base.update(over)
    return base


def journal_events(path: Path) -> list[str]:
    return [json.loads(line)["event"] for line in path.read_text().splitlines()]


def test_rerun_after_a_fault_sends_only_the_rest(
    tmp_path: Path, home: Path, fault: FaultServer
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    path = write_job(tmp_path, job())
    env = mailer_env(fault.url, home)
    fault.then(
        *[Reply()] * 4,
        default=Reply(429, "TooManyRequestsException", "Daily message quota exceeded."),
    )

    first = run_mailer(path, "--quiet", "--state-dir", str(state), env=env)
    assert (first.code, first.lines) == (
        EX_TEMPFAIL,
        [
            "error: SES daily sending quota exhausted in us-east-1 (TooManyRequestsException: "
            "Daily message quota exceeded.); not retried, a later run can send the rest "
            "(4 of 10 sent before)"
        ],
    )
    assert [r.to for r in fault.requests] == [[a] for a in RECIPIENTS[:5]]
    journal = state / "newsletter.journal"
    assert journal_events(journal) == ["start"] + ["try", "sent"] * 4 + ["try", "refused"]
    assert journal.stat().st_mode & 0o777 == 0o600

    fault.then(default=Reply())
    second = run_mailer(path, "--state-dir", str(state), env=env)
    assert second.code == 0, second.stderr
    assert [r.to for r in fault.requests[5:]] == [[a] for a in RECIPIENTS[4:]]
    assert "warning" not in second.stderr  # the refused one was a definite no
    assert any(
        line.startswith("info: resuming the unfinished run started ")
        and line.endswith("s ago: 4 message(s) already sent")
        for line in second.lines
    )
    assert not journal.exists()
    assert journal_events(state / "newsletter.journal.last")[-1] == "done"

    third = run_mailer(path, "--quiet", "--state-dir", str(state), env=env)
    assert (third.code, third.stderr) == (0, "")
    assert [r.to for r in fault.requests[11:]] == [[a] for a in RECIPIENTS]


def test_rerun_after_a_crash_resends_only_the_ambiguous_one(
    tmp_path: Path, home: Path, fault: FaultServer
) -> None:
    """SIGKILL while the 4th send is in flight: 3 are certain, the 4th may be a duplicate."""
    state = tmp_path / "state"
    state.mkdir()
    path = write_job(tmp_path, job())
    env = mailer_env(fault.url, home, STATE_DIRECTORY=str(state))  # as systemd sets it
    fault.then(Reply(), Reply(), Reply(), Reply(hang=True))
    process = start_mailer(path, "--quiet", env=env)
    deadline = time.monotonic() + 30
    while len(fault.requests) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=10)
    fault.state.release.set()
    assert len(fault.requests) == 4
    journal = state / "newsletter.journal"
    assert journal_events(journal) == ["start"] + ["try", "sent"] * 3 + ["try"]

    fault.then(default=Reply())
    second = run_mailer(path, "--quiet", env=env)
    assert second.code == 0
    assert second.lines == [
        "warning: message to:p003@example.com was being sent when the previous run stopped; "
        "sending it again (it may arrive twice)"
    ]
    assert [r.to for r in fault.requests[4:]] == [[a] for a in RECIPIENTS[3:]]
    assert not journal.exists()


def test_changed_job_or_old_journal_starts_afresh(
    tmp_path: Path, home: Path, fault: FaultServer
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    env = mailer_env(fault.url, home)
    path = write_job(tmp_path, job())
    fault.then(Reply(), Reply(), default=Reply(400, "LimitExceededException", "quota"))
    assert run_mailer(path, "--quiet", "--state-dir", str(state), env=env).code == EX_TEMPFAIL
    journal = state / "newsletter.journal"
    assert journal.exists()

    fault.then(default=Reply())
    changed = write_job(tmp_path, job(subject="Corrected news for ${recipient}"))
    result = run_mailer(changed, "--quiet", "--state-dir", str(state), env=env)
    assert result.code == 0
    assert result.lines == [
        f"warning: unfinished journal {journal} set aside (another job file content); "
        "starting afresh"
    ]
    assert len(fault.requests) == 3 + 10
    assert (state / "newsletter.journal.stale").exists()

    # an unfinished journal older than resume_window is not resumed either
    old = write_job(tmp_path, job(resume_window=60), "old.json")
    digest = hashlib.sha256(old.read_bytes()).hexdigest()
    header = {"event": "start", "job": "newsletter", "digest": digest, "started": time.time() - 61}
    journal.write_text(json.dumps(header) + "\n")
    result = run_mailer(old, "--quiet", "--state-dir", str(state), env=env)
    assert result.code == 0
    assert result.lines == [
        f"warning: unfinished journal {journal} set aside (too old); starting afresh"
    ]
    assert len(fault.requests) == 13 + 10


def test_command_not_rerun_when_its_mail_was_sent(tmp_path: Path, home: Path, moto: Moto) -> None:
    """A run that crashed after SES accepted its one message: the restart does nothing."""
    moto.verify()
    state = tmp_path / "state"
    state.mkdir()
    marker = tmp_path / "ran"
    path = write_job(
        tmp_path,
        job(
            to=["a@example.com"],
            per_recipient=None,
            subject="Backup",
            text=None,
            command={"argv": ["/usr/bin/touch", str(marker)]},
        ),
    )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    records = [
        {"event": "start", "job": "newsletter", "digest": digest, "started": time.time() - 5},
        {"event": "try", "key": "message"},
        {"event": "sent", "key": "message", "message_id": "earlier"},
        '{"event": "do',  # torn by the crash
    ]
    (state / "newsletter.journal").write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records)
    )
    result = run_mailer(path, "--state-dir", str(state), env=mailer_env(moto.url, home))
    assert result.code == 0
    assert result.lines[-1] == "info: job newsletter: every message of this run was already sent"
    assert not marker.exists()
    assert moto.sent_anywhere() == 0
    assert not (state / "newsletter.journal").exists()
    # the next scheduled run runs the command and mails again
    again = run_mailer(path, "--quiet", "--state-dir", str(state), env=mailer_env(moto.url, home))
    assert (again.code, again.stderr) == (0, "")
    assert marker.exists()
    assert len(moto.sent()) == 1


def test_unwritable_state_dir_fails_before_sending(
    tmp_path: Path, home: Path, fault: FaultServer
) -> None:
    state = tmp_path / "missing"
    path = write_job(tmp_path, job())
    result = run_mailer(path, "--quiet", "--state-dir", str(state), env=mailer_env(fault.url, home))
    assert (result.code, result.lines) == (
        73,
        [f"error: cannot write journal {state / 'newsletter.journal'}: No such file or directory"],
    )
    assert fault.requests == []
