"""Real sends against moto: headers as built, envelopes, regions (C05, C06, C07), modes."""

from __future__ import annotations

import email.header
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from moto.ses.models import SESBackend

from lab.imds import ImdsServer, MetadataService
from lab.imds import Moto as ImdsMoto
from tests.mailer.mailerlab import (
    REGION,
    SENDER,
    Moto,
    TinyImds,
    closed_url,
    envelope,
    mailer_env,
    run_mailer,
    start_mailer,
    write_job,
)

EX_DATAERR, EX_NOINPUT, EX_CONFIG = 65, 66, 78
MESSAGE_ID = r"[0-9a-z]+-[0-9a-z-]+"  # moto's message ids


def job(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "report",
        "from": f"Reports <{SENDER}>",
        "to": ["a@example.com"],
        "subject": "Report",
        "text": "Hello\n",
        "region": REGION,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def test_c07_headers_encoded_only_where_needed(tmp_path: Path, home: Path, moto: Moto) -> None:
    """C07: RFC 2047 for the display name and subject only; the IDN domain as punycode."""
    moto.verify()
    path = write_job(
        tmp_path,
        job(
            **{"from": f"Jürgen Müller <{SENDER}>"},
            to=["ops@bücher.example", "Plain Name <plain@example.com>"],
            cc=[{"address": "copy@example.com", "name": "Müller, Jürgen"}],
            bcc=["hidden@example.com"],
            reply_to=["Team <team@example.com>"],
            subject="Zusammenfassung \u2013 März",
            text="Grüße aus dem Mailer\n",
        ),
    )
    result = run_mailer(path, "--quiet", env=mailer_env(moto.url, home))
    assert (result.code, result.stdout, result.stderr) == (0, b"", "")
    [sent] = moto.sent()
    assert sent.header("From") == f"=?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <{SENDER}>"
    assert sent.header("Subject") == "Zusammenfassung =?utf-8?b?4oCTIE3DpHJ6?="
    assert sent.header("To") == "ops@xn--bcher-kva.example, Plain Name <plain@example.com>"
    assert sent.header("Cc") == "=?utf-8?q?M=C3=BCller=2C_J=C3=BCrgen?= <copy@example.com>"
    assert sent.header("Reply-To") == "Team <team@example.com>"
    decoded = str(email.header.make_header(email.header.decode_header(sent.header("Subject"))))
    assert decoded == "Zusammenfassung \u2013 März"
    assert sent.message["From"].addresses[0].display_name == "Jürgen Müller"
    # Bcc: in the envelope only, never in a header
    assert "hidden@example.com" not in sent.raw
    assert "bcc" not in sent.raw.lower()
    assert envelope(sent) == {
        "ops@xn--bcher-kva.example",
        "plain@example.com",
        "copy@example.com",
        "hidden@example.com",
    }
    assert sent.source == SENDER
    assert sent.text() == "Grüße aus dem Mailer\n"
    assert sent.raw.isascii()  # 7bit transfer encodings throughout
    assert sent.header("Auto-Submitted") == "auto-generated"


def test_progress_lines_name_the_message_id(tmp_path: Path, home: Path, moto: Moto) -> None:
    moto.verify()
    path = write_job(tmp_path, job(to=["a@example.com", "b@example.com"]))
    result = run_mailer(path, "--state-dir", str(tmp_path), env=mailer_env(moto.url, home))
    assert result.code == 0
    assert len(result.lines) == 3
    assert (
        result.lines[0]
        == "info: job report: sending 1 message(s) from ops@example.com via SES in us-east-1"
    )
    assert re.fullmatch(
        rf"info: message to 2 recipient\(s\) accepted by SES: MessageId {MESSAGE_ID}",
        result.lines[1],
    )
    assert re.fullmatch(r"info: job report: 1 message\(s\) sent in \d+\.\d s", result.lines[2])


def test_c05_sender_verified_in_another_region(tmp_path: Path, home: Path, moto: Moto) -> None:
    """C05: verified in eu-west-1 only, job targets us-east-1: one line, exit 78, nothing sent."""
    moto.verify(SENDER, "eu-west-1")
    path = write_job(tmp_path, job(region="us-east-1"))
    result = run_mailer(path, "--quiet", env=mailer_env(moto.url, home, region="eu-west-1"))
    assert (result.code, result.stdout, result.lines) == (
        EX_CONFIG,
        b"",
        [
            "error: sender ops@example.com is not verified in us-east-1: verify the address or "
            "its domain as an SES identity in that region, or set the job's region to where it "
            "is verified"
        ],
    )
    assert moto.sent_anywhere() == 0
    # at the default level: the start line, then the same error line; never a traceback
    loud = run_mailer(path, env=mailer_env(moto.url, home))
    assert loud.code == EX_CONFIG
    assert loud.lines[-1] == result.lines[0]
    assert "info: job report: sending 1 message(s) from ops@example.com via SES in us-east-1" in (
        loud.lines
    )
    assert "Traceback" not in loud.stderr
    # the same job pointed at eu-west-1 goes out
    fixed = write_job(tmp_path, job(region="eu-west-1"), "fixed.json")
    assert run_mailer(fixed, "--quiet", env=mailer_env(moto.url, home)).code == 0
    assert len(moto.sent("eu-west-1")) == 1


def test_debug_shows_the_traceback(tmp_path: Path, home: Path, moto: Moto) -> None:
    path = write_job(tmp_path, job())
    result = run_mailer(path, "--debug", env=mailer_env(moto.url, home))
    assert result.code == EX_CONFIG
    assert "error: sender ops@example.com is not verified in us-east-1" in result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert "MessageRejected" in result.stderr


def test_c06_no_region_anywhere(tmp_path: Path, home: Path, moto: Moto) -> None:
    """C06: no job region, no AWS_* region, metadata unreachable: one line, exit 78."""
    moto.verify()
    path = write_job(tmp_path, job(region=None))
    for imds in (None, closed_url() + "/"):
        env = mailer_env(moto.url, home, region=None, imds_url=imds, static_credentials=True)
        result = run_mailer(path, "--quiet", env=env)
        assert (result.code, result.stdout, result.lines) == (
            EX_CONFIG,
            b"",
            [
                "error: no region: set region in the job or AWS_REGION, or run on EC2 with "
                "instance metadata reachable"
            ],
        )
    assert moto.sent_anywhere() == 0


def test_c06_region_from_the_job(tmp_path: Path, home: Path, moto: Moto) -> None:
    moto.verify(SENDER, "eu-central-1")
    path = write_job(tmp_path, job(region="eu-central-1"))
    env = mailer_env(moto.url, home, region=None)
    assert run_mailer(path, "--quiet", env=env).code == 0
    assert len(moto.sent("eu-central-1")) == 1


def test_c06_region_from_aws_region(tmp_path: Path, home: Path, moto: Moto) -> None:
    moto.verify(SENDER, "ap-southeast-2")
    path = write_job(tmp_path, job(region=None))
    env = mailer_env(moto.url, home, region="eu-west-3", AWS_REGION="ap-southeast-2")
    assert run_mailer(path, "--quiet", env=env).code == 0
    assert len(moto.sent("ap-southeast-2")) == 1


def test_c06_region_and_instance_id_from_imdsv2(tmp_path: Path, home: Path, moto: Moto) -> None:
    moto.verify(SENDER, "eu-west-2")
    imds = TinyImds("eu-west-2", "i-0aaaabbbbccccdddd").start()
    try:
        path = write_job(
            tmp_path, job(region=None, subject="${instance_id} in ${region}", text="${instance_id}")
        )
        env = mailer_env(moto.url, home, region=None, imds_url=imds.url, static_credentials=True)
        result = run_mailer(path, "--quiet", env=env)
    finally:
        imds.stop()
    assert (result.code, result.stderr) == (0, "")
    [sent] = moto.sent("eu-west-2")
    assert sent.header("Subject") == "i-0aaaabbbbccccdddd in eu-west-2"
    # the token flow: every GET carried a token from a PUT
    assert imds.log[0] == "PUT /latest/api/token"
    assert "GET /latest/meta-data/placement/region" in imds.log
    assert "GET /latest/meta-data/instance-id" in imds.log


@pytest.fixture
def instance_with_role(moto: Moto) -> Iterator[tuple[str, str]]:
    """An EC2 instance with an instance profile in moto, and lab/imds.py serving it."""
    ec2 = moto.client("ec2", "eu-west-1")
    iam = moto.client("iam")
    trust = (
        '{"Version":"2012-10-17","Statement":[{"Effect":"Allow",'
        '"Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}'
    )
    iam.create_role(RoleName="mailer-role", AssumeRolePolicyDocument=trust)
    iam.create_instance_profile(InstanceProfileName="mailer-profile")
    iam.add_role_to_instance_profile(InstanceProfileName="mailer-profile", RoleName="mailer-role")
    image = ec2.describe_images()["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1)["Instances"][0]
    instance_id = instance["InstanceId"]
    ec2.associate_iam_instance_profile(
        IamInstanceProfile={"Name": "mailer-profile"}, InstanceId=instance_id
    )
    server = ImdsServer(
        ("127.0.0.1", 0),
        MetadataService(ImdsMoto(moto.url, "eu-west-1", instance_id), "eu-west-1"),
    ).start()
    try:
        yield server.url, instance_id
    finally:
        server.stop()


def test_instance_role_chain_without_static_keys(
    tmp_path: Path, home: Path, moto: Moto, instance_with_role: tuple[str, str]
) -> None:
    """Production path: no keys, no region in the environment; both come from IMDSv2."""
    imds_url, instance_id = instance_with_role
    moto.verify(SENDER, "eu-west-1")
    path = write_job(tmp_path, job(region=None, subject="from ${instance_id}"))
    env = mailer_env(moto.url, home, region=None, imds_url=imds_url)
    assert "AWS_ACCESS_KEY_ID" not in env
    result = run_mailer(path, "--quiet", env=env)
    assert (result.code, result.stderr) == (0, "")
    [sent] = moto.sent("eu-west-1")
    assert sent.header("Subject") == f"from {instance_id}"


def test_dry_run_prints_mime_and_sends_nothing(tmp_path: Path, home: Path, moto: Moto) -> None:
    moto.verify()
    path = write_job(
        tmp_path,
        job(
            subject="Zusammenfassung \u2013 März",
            to=["ops@bücher.example"],
            bcc=["hidden@example.com"],
            html="<p>${job} &amp; more</p>",
        ),
    )
    result = run_mailer(path, "--dry-run", "--quiet", env=mailer_env(closed_url(), home))
    assert (result.code, result.stderr) == (0, "")
    text = result.stdout.decode("ascii")
    assert text.startswith(f"From: Reports <{SENDER}>\r\nTo: ops@xn--bcher-kva.example\r\n")
    assert "Subject: Zusammenfassung =?utf-8?b?4oCTIE3DpHJ6?=\r\n" in text
    assert "Content-Type: multipart/alternative;" in text
    assert "<p>report &amp; more</p>" in text
    assert "hidden@example.com" not in text
    assert moto.sent_anywhere() == 0
    loud = run_mailer(path, "--dry-run", env=mailer_env(closed_url(), home))
    assert loud.lines[0].startswith(
        "info: dry run: message 1 of 1, envelope from ops@example.com to "
        "ops@xn--bcher-kva.example, hidden@example.com ("
    )
    assert loud.lines[1] == "info: dry run: 1 message(s) not sent"


def test_attachments_by_glob(tmp_path: Path, home: Path, moto: Moto) -> None:
    moto.verify()
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "b.csv").write_text("b,2\n")
    (reports / "a.csv").write_text("a,1\n")
    (reports / "notes.txt").write_text("not me\n")
    (tmp_path / "Übersicht.pdf").write_bytes(b"%PDF-1.4 fake\n")
    path = write_job(
        tmp_path,
        job(attachments=[str(reports / "*.csv"), str(tmp_path / "Übersicht.pdf")]),
    )
    assert run_mailer(path, "--quiet", env=mailer_env(moto.url, home)).code == 0
    [sent] = moto.sent()
    parts = list(sent.message.iter_attachments())
    assert [(p.get_filename(), p.get_content_type()) for p in parts] == [
        ("a.csv", "text/csv"),
        ("b.csv", "text/csv"),
        ("Übersicht.pdf", "application/pdf"),
    ]
    assert parts[2].get_content() == b"%PDF-1.4 fake\n"


def test_missing_attachment_fails_or_is_skipped(tmp_path: Path, home: Path, moto: Moto) -> None:
    moto.verify()
    pattern = str(tmp_path / "none" / "*.csv")
    path = write_job(tmp_path, job(attachments=[pattern]))
    result = run_mailer(path, "--quiet", env=mailer_env(moto.url, home))
    assert (result.code, result.lines) == (
        EX_NOINPUT,
        [f"error: attachment {pattern} matches no file"],
    )
    assert moto.sent_anywhere() == 0
    allowed = write_job(
        tmp_path, job(attachments=[pattern], allow_missing_attachments=True), "ok.json"
    )
    result = run_mailer(allowed, "--quiet", env=mailer_env(moto.url, home))
    assert (result.code, result.lines) == (
        0,
        [f"warning: attachment {pattern} matches no file: skipped"],
    )
    assert len(moto.sent()) == 1


def test_message_over_40_mb_after_encoding_is_refused(
    tmp_path: Path, home: Path, moto: Moto
) -> None:
    """31 MB of data is under 40 MB raw but over it once base64 encoded."""
    moto.verify()
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * 31_000_000)
    path = write_job(tmp_path, job(attachments=[str(big)]))
    result = run_mailer(path, "--quiet", env=mailer_env(moto.url, home), timeout=120)
    assert result.code == EX_DATAERR
    assert re.fullmatch(
        r"error: message to 1 recipient\(s\) is 4\d{7} bytes after encoding; "
        r"the SES limit is 40000000 bytes",
        result.stderr.strip(),
    )
    assert moto.sent_anywhere() == 0


def test_tags_and_configuration_set_reach_ses(tmp_path: Path, home: Path, moto: Moto) -> None:
    moto.verify()
    moto.client("sesv2").create_configuration_set(ConfigurationSetName="mailer-events")
    path = write_job(tmp_path, job(configuration_set="mailer-events", tags={"job": "report"}))
    assert run_mailer(path, "--quiet", env=mailer_env(moto.url, home)).code == 0
    assert len(moto.sent()) == 1


def test_per_recipient_120_personalised_and_paced(
    tmp_path: Path, home: Path, moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """120 recipients, one message each, at most max_rate send calls started per second."""
    arrivals: list[float] = []
    original = SESBackend.send_raw_email

    def timed(self: SESBackend, *args: Any, **kwargs: Any) -> Any:
        arrivals.append(time.monotonic())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SESBackend, "send_raw_email", timed)
    moto.verify()
    rate = 60.0
    recipients = [f"Person {i} <p{i:03d}@example.com>" for i in range(120)]
    path = write_job(
        tmp_path,
        job(
            to=recipients,
            subject="For ${recipient_name}",
            text="Dear ${recipient_name} (${recipient})\n",
            per_recipient={"max_rate": rate, "concurrency": 8},
        ),
    )
    result = run_mailer(path, "--quiet", env=mailer_env(moto.url, home))
    assert (result.code, result.stderr) == (0, "")
    sent = moto.sent()
    assert len(sent) == 120
    by_to = {s.header("To"): s for s in sent}
    for i in range(120):
        message = by_to[f"Person {i} <p{i:03d}@example.com>"]
        assert message.header("Subject") == f"For Person {i}"
        assert message.text() == f"Dear Person {i} (p{i:03d}@example.com)\n"
        assert envelope(message) == {f"p{i:03d}@example.com"}
    arrivals.sort()
    span = arrivals[-1] - arrivals[0]
    assert span >= 119 / rate * 0.9, f"120 sends in {span:.2f} s: not paced to {rate}/s"
    assert span <= 119 / rate + 10.0, f"120 sends took {span:.2f} s"
    # Calls start paced; they arrive with network and scheduling jitter, so a window can
    # also hold the few (at most `concurrency`) that started late in the window before.
    busiest = max(sum(1 for t in arrivals if start <= t < start + 1.0) for start in arrivals)
    assert busiest <= rate + 8, f"{busiest} sends within one second at max_rate {rate}"


def test_per_recipient_rate_from_account_quota(tmp_path: Path, home: Path, moto: Moto) -> None:
    """moto has no SES v2 GetAccount; GetSendQuota says 1/s, which caps max_rate 50."""
    moto.verify()
    path = write_job(
        tmp_path,
        job(
            to=["a@example.com", "b@example.com", "c@example.com"],
            per_recipient={"max_rate": 50, "rate_from_quota": True, "concurrency": 3},
        ),
    )
    result = run_mailer(path, env=mailer_env(moto.url, home))
    assert result.code == 0
    assert "info: account sending rate: 1 messages/s" in result.lines
    assert "info: per-recipient mode: 3 message(s) at most 1/s, 3 at once" in result.lines
    assert result.seconds >= 2.0
    assert len(moto.sent()) == 3


@pytest.mark.parametrize(
    ("argv", "send_when", "sends", "status", "fragment"),
    [
        (["/bin/sh", "-c", "echo all good"], "always", True, "0", "all good"),
        (["/bin/true"], "always", True, "0", ""),
        (["/bin/sh", "-c", "echo boom >&2; exit 3"], "on_failure", True, "3", "boom"),
        (["/bin/true"], "on_failure", False, "0", ""),
        (["/bin/sh", "-c", "echo output"], "on_failure", False, "0", ""),
        (["/bin/sh", "-c", "echo output"], "on_output", True, "0", "output"),
        (["/bin/true"], "on_output", False, "0", ""),
        (["/bin/sh", "-c", "kill -9 $$"], "on_failure", True, "killed by signal 9", ""),
        (
            ["/nonexistent/cmd"],
            "on_failure",
            True,
            "could not start: No such file or directory",
            "",
        ),
    ],
)
def test_command_mode_send_when(
    tmp_path: Path,
    home: Path,
    moto: Moto,
    *,
    argv: list[str],
    send_when: str,
    sends: bool,
    status: str,
    fragment: str,
) -> None:
    moto.verify()
    path = write_job(
        tmp_path,
        job(
            text=None,
            subject="${job}: exit ${exit_status}",
            command={"argv": argv, "send_when": send_when},
        ),
    )
    result = run_mailer(path, env=mailer_env(moto.url, home))
    assert result.code == 0, result.stderr
    assert "Traceback" not in result.stderr
    sent = moto.sent()
    assert len(sent) == (1 if sends else 0)
    if sends:
        body = sent[0].text()
        assert sent[0].header("Subject") == f"report: exit {status}"
        assert f"Exit status: {status}\n" in body
        assert f"Command: {' '.join(argv)}" in body or "Command: " in body
        assert fragment in body
    else:
        assert result.lines[-1].endswith(f"nothing to send (send_when {send_when})")


def test_command_timeout_kills_and_reports(tmp_path: Path, home: Path, moto: Moto) -> None:
    moto.verify()
    path = write_job(
        tmp_path,
        job(
            text="${exit_status}|${output}",
            command={
                "argv": ["/bin/sh", "-c", "echo started; sleep 30"],
                "timeout": 1,
                "send_when": "on_failure",
            },
        ),
    )
    result = run_mailer(path, "--quiet", env=mailer_env(moto.url, home))
    assert result.code == 0
    assert result.seconds < 15
    assert result.lines == [
        "warning: command finished: exit status timed out after 1 s, 8 bytes of output"
    ]
    [sent] = moto.sent()
    assert sent.text() == "timed out after 1 s|started\n"


def test_command_output_is_html_escaped(tmp_path: Path, home: Path, moto: Moto) -> None:
    moto.verify()
    path = write_job(
        tmp_path,
        job(
            text=None,
            html="<pre>${output}</pre>",
            command={"argv": ["/bin/sh", "-c", "echo '<b>&'"]},
        ),
    )
    assert run_mailer(path, "--quiet", env=mailer_env(moto.url, home)).code == 0
    [sent] = moto.sent()
    part = sent.message.get_body(preferencelist=("html",))
    assert part is not None
    assert part.get_content().replace("\r\n", "\n") == "<pre>&lt;b&gt;&amp;\n</pre>\n"


def test_sigterm_kills_the_command_and_exits_75(tmp_path: Path, home: Path, moto: Moto) -> None:
    """systemd stops a run (TimeoutStartSec, systemctl stop): the command goes too."""
    moto.verify()
    pidfile = tmp_path / "pid"
    path = write_job(
        tmp_path,
        job(text=None, command={"argv": ["/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"]}),
    )
    process = start_mailer(path, "--quiet", env=mailer_env(moto.url, home))
    deadline = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pidfile.read_text())
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=20)
    assert (process.returncode, stdout, stderr.decode()) == (
        75,
        b"",
        "error: terminated by SIGTERM\n",
    )
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    assert moto.sent_anywhere() == 0
