"""SES faults through a loopback endpoint that counts every HTTP request.

moto never throttles, has no quota and (without IAM enforcement) never denies;
these replies are what SES v2 sends in those cases.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.mailer.mailerlab import (
    SENDER,
    FaultServer,
    Reply,
    TinyImds,
    closed_url,
    mailer_env,
    run_mailer,
    write_job,
)

EX_UNAVAILABLE, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 69, 75, 77, 78
RATE = "Maximum sending rate exceeded."
DAILY = "Daily message quota exceeded."


def job(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "report",
        "from": SENDER,
        "to": ["a@example.com"],
        "subject": "Report",
        "text": "Hello\n",
        "region": "us-east-1",
        "retry": {"mode": "standard", "max_attempts": 4},
    }
    base.update(over)
    return base


def test_throttling_is_retried_then_sent(tmp_path: Path, home: Path, fault: FaultServer) -> None:
    fault.then(Reply(429, "TooManyRequestsException", RATE), Reply(400, "Throttling", RATE))
    path = write_job(tmp_path, job())
    result = run_mailer(path, env=mailer_env(fault.url, home))
    assert result.code == 0, result.stderr
    assert len(fault.requests) == 3
    assert "info: message to 1 recipient(s) accepted by SES: MessageId fault-0003" in result.lines
    # every attempt carried the same raw message
    assert len({r.raw for r in fault.requests}) == 1


@pytest.mark.parametrize("mode", ["standard", "adaptive"])
def test_throttling_after_all_attempts_is_tempfail(
    tmp_path: Path, home: Path, fault: FaultServer, mode: str
) -> None:
    fault.then(default=Reply(429, "TooManyRequestsException", RATE))
    path = write_job(tmp_path, job(retry={"mode": mode, "max_attempts": 3}))
    result = run_mailer(path, "--quiet", env=mailer_env(fault.url, home))
    assert (result.code, result.stdout, result.lines) == (
        EX_TEMPFAIL,
        b"",
        [
            "error: SES throttled ses:SendEmail in us-east-1 after 3 attempt(s) "
            f"(TooManyRequestsException: {RATE})"
        ],
    )
    assert len(fault.requests) == 3


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (429, "TooManyRequestsException", DAILY),
        (400, "Throttling", DAILY),
        (400, "LimitExceededException", "Sending quota exceeded for the last 24 hours."),
        (400, "MessageRejected", "Sending suspended: daily sending quota exceeded."),
    ],
)
@pytest.mark.parametrize("mode", ["standard", "adaptive"])
def test_daily_quota_is_never_retried(
    tmp_path: Path,
    home: Path,
    fault: FaultServer,
    *,
    status: int,
    code: str,
    message: str,
    mode: str,
) -> None:
    """Exactly one HTTP attempt, although botocore would retry these codes."""
    fault.then(default=Reply(status, code, message))
    path = write_job(tmp_path, job(retry={"mode": mode, "max_attempts": 10}))
    result = run_mailer(path, "--quiet", env=mailer_env(fault.url, home))
    assert (result.code, result.lines) == (
        EX_TEMPFAIL,
        [
            f"error: SES daily sending quota exhausted in us-east-1 ({code}: {message}); "
            "not retried, a later run can send the rest"
        ],
    )
    assert len(fault.requests) == 1


def test_access_denied_names_the_action(tmp_path: Path, home: Path, fault: FaultServer) -> None:
    denial = (
        "User: arn:aws:sts::123456789012:assumed-role/mailer-role/i-0123 is not authorized "
        "to perform: ses:SendRawEmail on resource: "
        "arn:aws:ses:us-east-1:123456789012:identity/ops@example.com"
    )
    fault.then(default=Reply(403, "AccessDeniedException", denial))
    path = write_job(tmp_path, job())
    result = run_mailer(path, "--quiet", env=mailer_env(fault.url, home))
    assert (result.code, result.lines) == (
        EX_NOPERM,
        [
            "error: access denied for ses:SendRawEmail in us-east-1 (sender ops@example.com): "
            "the instance profile's role policy must allow ses:SendRawEmail"
        ],
    )
    assert len(fault.requests) == 1


def test_access_denied_without_action_in_message(
    tmp_path: Path, home: Path, fault: FaultServer
) -> None:
    fault.then(default=Reply(403, "AccessDenied", "Access Denied"))
    path = write_job(tmp_path, job())
    result = run_mailer(path, "--quiet", env=mailer_env(fault.url, home))
    assert (result.code, result.lines) == (
        EX_NOPERM,
        [
            "error: access denied for ses:SendEmail in us-east-1 (sender ops@example.com): "
            "the instance profile's role policy must allow ses:SendEmail"
        ],
    )


def test_access_denied_as_xml_like_moto_iam(tmp_path: Path, home: Path, fault: FaultServer) -> None:
    """moto with IAM enforcement answers SES v2 denials in XML: the action is still named."""
    body = (
        "<ErrorResponse><Errors><Error><Code>AccessDenied</Code><Message>User: "
        "arn:aws:iam::123456789012:user/u is not authorized to perform: ses:SendEmail"
        "</Message><Type>Sender</Type></Error></Errors></ErrorResponse>"
    )
    fault.then(default=Reply(403, xml=body))
    path = write_job(tmp_path, job())
    result = run_mailer(path, "--quiet", env=mailer_env(fault.url, home))
    assert (result.code, result.lines) == (
        EX_NOPERM,
        [
            "error: access denied for ses:SendEmail in us-east-1 (sender ops@example.com): "
            "the instance profile's role policy must allow ses:SendEmail"
        ],
    )
    assert len(fault.requests) == 1


def test_server_errors_retried_then_sent(tmp_path: Path, home: Path, fault: FaultServer) -> None:
    fault.then(Reply(503, "ServiceUnavailable", "try later"), Reply(500, "InternalFailure", "x"))
    path = write_job(tmp_path, job())
    result = run_mailer(path, "--quiet", env=mailer_env(fault.url, home))
    assert (result.code, result.stderr) == (0, "")
    assert len(fault.requests) == 3


def test_server_errors_after_all_attempts(tmp_path: Path, home: Path, fault: FaultServer) -> None:
    fault.then(default=Reply(500, "InternalFailure", "boom"))
    path = write_job(tmp_path, job(retry={"max_attempts": 2}))
    result = run_mailer(path, "--quiet", env=mailer_env(fault.url, home))
    assert (result.code, result.lines) == (
        EX_TEMPFAIL,
        ["error: SES failed in us-east-1 after 2 attempt(s): InternalFailure: boom"],
    )
    assert len(fault.requests) == 2


def test_sandbox_recipient_not_verified(tmp_path: Path, home: Path, fault: FaultServer) -> None:
    fault.then(
        default=Reply(
            400,
            "MessageRejected",
            "Email address is not verified. The following identities failed the check in "
            "region US-EAST-1: a@example.com",
        )
    )
    path = write_job(tmp_path, job())
    result = run_mailer(path, "--quiet", env=mailer_env(fault.url, home))
    assert (result.code, result.lines) == (
        EX_CONFIG,
        [
            "error: recipient(s) a@example.com not verified in us-east-1: the account is in "
            "the SES sandbox there (verify them or request production access)"
        ],
    )


def test_account_paused_is_unavailable(tmp_path: Path, home: Path, fault: FaultServer) -> None:
    fault.then(default=Reply(400, "SendingPausedException", "Sending is paused"))
    path = write_job(tmp_path, job())
    result = run_mailer(path, "--quiet", env=mailer_env(fault.url, home))
    assert (result.code, result.lines) == (
        EX_UNAVAILABLE,
        ["error: SES sending is paused for this account in us-east-1: Sending is paused"],
    )


NO_CREDENTIALS = (
    "error: no AWS credentials found: attach an instance profile to this instance and check "
    "that IMDSv2 is reachable (metadata enabled, hop limit 2 when the program runs in a "
    "container, AWS_EC2_METADATA_DISABLED unset)"
)


def test_no_credentials_hints_at_instance_profile(
    tmp_path: Path, home: Path, fault: FaultServer
) -> None:
    path = write_job(tmp_path, job())
    env = mailer_env(fault.url, home, static_credentials=False)
    assert "AWS_ACCESS_KEY_ID" not in env
    result = run_mailer(path, "--quiet", env=env)
    assert (result.code, result.stdout, result.lines) == (EX_CONFIG, b"", [NO_CREDENTIALS])
    assert fault.requests == []


def test_no_credentials_when_instance_has_no_profile(
    tmp_path: Path, home: Path, fault: FaultServer
) -> None:
    """IMDS answers, but has no role (404 on security-credentials): the same one line."""
    imds = TinyImds("us-east-1").start()
    try:
        path = write_job(tmp_path, job())
        env = mailer_env(fault.url, home, imds_url=imds.url, static_credentials=False)
        result = run_mailer(path, "--quiet", env=env)
    finally:
        imds.stop()
    assert (result.code, result.lines) == (EX_CONFIG, [NO_CREDENTIALS])
    assert any("security-credentials" in line for line in imds.log)
    assert fault.requests == []


def test_ses_unreachable_is_tempfail(tmp_path: Path, home: Path) -> None:
    path = write_job(tmp_path, job(retry={"max_attempts": 2}, connect_timeout=1))
    url = closed_url()
    result = run_mailer(path, "--quiet", env=mailer_env(url, home))
    assert result.code == EX_TEMPFAIL
    assert re.fullmatch(
        rf"error: cannot reach SES in us-east-1: Could not connect to the endpoint URL: "
        rf"\"{re.escape(url)}/v2/email/outbound-emails\"",
        result.stderr.strip(),
    )


def test_per_recipient_sends_concurrently(tmp_path: Path, home: Path, fault: FaultServer) -> None:
    """SES answering in 0.4 s: 12 messages at concurrency 4 overlap, never more than 4."""
    fault.then(default=Reply(delay=0.4))
    recipients = [f"p{i}@example.com" for i in range(12)]
    path = write_job(
        tmp_path, job(to=recipients, per_recipient={"max_rate": 100, "concurrency": 4})
    )
    result = run_mailer(path, "--quiet", env=mailer_env(fault.url, home))
    assert (result.code, result.stderr) == (0, "")
    assert sorted(r.to[0] for r in fault.requests) == sorted(recipients)
    assert fault.state.max_in_flight == 4
    starts = sorted(r.at for r in fault.requests)
    assert starts[-1] - starts[0] < 12 * 0.4 / 2  # well under the serial time
