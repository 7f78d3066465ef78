"""The mail program refuses bad job files before any send, with one line and a sysexits code.

Every run here points the program at a loopback port nothing listens on (or at
moto, to prove nothing arrived): validation must never need the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.mailer.mailerlab import (
    SENDER,
    Moto,
    closed_url,
    mailer_env,
    run_mailer,
    write_job,
)

EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_CONFIG = 64, 65, 66, 78


def job(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "report",
        "from": f"Reports <{SENDER}>",
        "to": ["a@example.com"],
        "subject": "Report ${date}",
        "text": "Hello from ${host}\n",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def offline_env(home: Path) -> dict[str, str]:
    """SES and IMDS both at closed loopback ports, no region anywhere."""
    return mailer_env(closed_url(), home, region=None, imds_url=closed_url() + "/")


def test_check_config_passes_without_network_or_region(tmp_path: Path, home: Path) -> None:
    """The role's validate: step runs on hosts with no AWS access: only the file is checked."""
    path = write_job(
        tmp_path,
        job(
            attachments=[str(tmp_path / "later" / "*.csv")],  # nothing matches yet: fine
            command={"argv": ["/bin/false"], "send_when": "on_failure"},
            tags={"job": "report"},
            configuration_set="mailer-events",
            per_recipient=None,
        ),
    )
    result = run_mailer(path, "--check-config", env=offline_env(home))
    assert (result.code, result.stdout, result.lines) == (
        0,
        b"",
        ["info: job report: configuration is valid"],
    )
    quiet = run_mailer(path, "--check-config", "--quiet", env=offline_env(home))
    assert (quiet.code, quiet.stdout, quiet.stderr) == (0, b"", "")


def test_check_config_does_not_run_the_command(tmp_path: Path, home: Path) -> None:
    marker = tmp_path / "ran"
    path = write_job(tmp_path, job(command={"argv": ["/usr/bin/touch", str(marker)]}))
    result = run_mailer(path, "--check-config", "--quiet", env=offline_env(home))
    assert (result.code, result.stderr) == (0, "")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("over", "line"),
    [
        ({"subjet": "x"}, "unknown key 'subjet' in the job file (did you mean 'subject'?)"),
        (
            {"command": {"argv": ["/bin/true"], "timout": 5}},
            "unknown key 'command.timout' in the job file (did you mean 'timeout'?)",
        ),
        (
            {"per_recipient": {"max_rate": 2, "concurency": 2}},
            "unknown key 'per_recipient.concurency' in the job file (did you mean 'concurrency'?)",
        ),
        ({"retry": {"mode": "fast"}}, "'retry.mode' must be one of standard, adaptive, not 'fast'"),
        ({"subject": None}, "'subject' is required in the job file"),
        ({"text": None}, "no body: give 'text', 'text_file', 'html' or 'html_file'"),
        ({"to": []}, "no recipients: give at least one address in 'to', 'cc' or 'bcc'"),
        (
            {"name": "../etc"},
            "'name' '../etc' must match [A-Za-z0-9][A-Za-z0-9_.@-]* (at most 64 characters)",
        ),
        ({"region": "moon-1"}, "'region' 'moon-1' is not an AWS region name"),
        (
            {
                "to": [f"r{i}@example.com" for i in range(40)],
                "cc": [f"c{i}@example.com" for i in range(11)],
            },
            "51 recipients in one message; SES allows 50 (to+cc+bcc): "
            "use 'per_recipient' or split the job",
        ),
        (
            {"per_recipient": {}, "cc": ["c@example.com"]},
            "'cc' and 'bcc' cannot be used with 'per_recipient' (each message has one 'to')",
        ),
        (
            {"text_file": "templates/body.txt", "text": None},
            "'text_file' must be an absolute path, not 'templates/body.txt'",
        ),
        (
            {"tags": {"job name": "x"}},
            "tag name 'job name' must match [A-Za-z0-9_-] (1..256 characters)",
        ),
        ({"retry": {"max_attempts": 0}}, "'retry.max_attempts' must be between 1 and 10, not 0"),
        ({"command": {"argv": "echo hi"}}, "'command.argv' must be a non-empty list of strings"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_bad_job_is_one_line_exit_65(
    tmp_path: Path, home: Path, over: dict[str, Any], line: str
) -> None:
    path = write_job(tmp_path, job(**over))
    result = run_mailer(path, "--check-config", env=offline_env(home))
    assert (result.code, result.stdout, result.lines) == (EX_DATAERR, b"", [f"error: {line}"])


@pytest.mark.parametrize(
    ("over", "line"),
    [
        (
            {"subject": "Report for ${recipient}"},
            "unknown placeholder ${recipient} in subject; available here: "
            "date, datetime, host, instance_id, job, region",
        ),
        (
            {"text": "exit ${exit_status}"},
            "unknown placeholder ${exit_status} in text; available here: "
            "date, datetime, host, instance_id, job, region",
        ),
        (
            {"html": "<p>${hots}</p>", "text": None},
            "unknown placeholder ${hots} in html; available here: "
            "date, datetime, host, instance_id, job, region",
        ),
        (
            {"text": "costs 5$ today"},
            "invalid placeholder in text (line 1): use ${name}, or $$ for '$'",
        ),
    ],
)
def test_placeholders_checked(tmp_path: Path, home: Path, over: dict[str, Any], line: str) -> None:
    path = write_job(tmp_path, job(**over))
    result = run_mailer(path, "--check-config", env=offline_env(home))
    assert (result.code, result.lines) == (EX_DATAERR, [f"error: {line}"])


def test_template_file_placeholders_checked(tmp_path: Path, home: Path) -> None:
    template = tmp_path / "body.txt"
    template.write_text("Line one\nOutput: ${output}\n", encoding="utf-8")
    path = write_job(tmp_path, job(text=None, text_file=str(template)))
    result = run_mailer(path, "--check-config", env=offline_env(home))
    assert result.code == EX_DATAERR
    assert result.lines == [
        "error: unknown placeholder ${output} in text; available here: "
        "date, datetime, host, instance_id, job, region"
    ]
    ok = write_job(
        tmp_path, job(text=None, text_file=str(template), command={"argv": ["/bin/true"]})
    )
    assert run_mailer(ok, "--check-config", "--quiet", env=offline_env(home)).code == 0


@pytest.mark.parametrize(
    ("over", "where"),
    [
        ({"aws_access_key_id": "x"}, "key 'aws_access_key_id'"),
        ({"tags": {"aws_secret_access_key": "x"}}, "key 'tags.aws_secret_access_key'"),
        ({"command": {"argv": ["/bin/true"], "secret": "x"}}, "key 'command.secret'"),
        ({"text": f"key {'AKIA' + 'Z' * 16} here"}, "the value of 'text'"),
        (
            {"command": {"argv": ["env", "AWS_ACCESS_KEY_ID=ASIA" + "Z" * 16]}},
            "the value of 'command.argv[1]'",
        ),
        ({"text": "[default]\naws_secret_access_key = abc\n"}, "the value of 'text'"),
    ],
)
def test_credential_material_rejected_exit_78(
    tmp_path: Path, home: Path, over: dict[str, Any], where: str
) -> None:
    path = write_job(tmp_path, job(**over))
    result = run_mailer(path, "--check-config", env=offline_env(home))
    assert (result.code, result.lines) == (
        EX_CONFIG,
        [
            f"error: the job file contains credential material ({where}): remove it; "
            "the mailer takes credentials only from the instance role"
        ],
    )
    assert "ZZZZ" not in result.stderr  # the value itself is never echoed


def test_c07_empty_address_rejected_before_any_send(tmp_path: Path, home: Path, moto: Moto) -> None:
    """C07: a list with an empty string fails the whole job, naming the value; moto gets nothing."""
    moto.verify()
    path = write_job(
        tmp_path, job(to=["ok@example.com", "ops@bücher.example", ""], region="us-east-1")
    )
    result = run_mailer(path, "--quiet", env=mailer_env(moto.url, home))
    assert (result.code, result.stdout, result.lines) == (
        EX_DATAERR,
        b"",
        ["error: empty address in to[2]: ''"],
    )
    assert moto.sent_anywhere() == 0


@pytest.mark.parametrize(
    ("field", "value", "line"),
    [
        ("to", ["foo@"], "malformed address in to[0]: 'foo@' (expected user@domain)"),
        ("to", ["   "], "empty address in to[0]: '   '"),
        (
            "cc",
            ["a@b@example.com"],
            "malformed address in cc[0]: 'a@b@example.com' (expected user@domain)",
        ),
        (
            "to",
            ["jürgen@example.com"],
            "address 'jürgen@example.com' in to[0] has a non-ASCII local part: "
            "SES cannot send to it",
        ),
        (
            "bcc",
            "ops@localhost",
            "malformed address in bcc: 'ops@localhost' (invalid domain 'localhost')",
        ),
        (
            "to",
            ["Ops <ops@exa mple.com>"],
            "malformed address in to[0]: 'Ops <ops@exa mple.com>' (invalid domain 'exa mple.com')",
        ),
        (
            "to",
            ["ops@-bad.example"],
            "malformed address in to[0]: 'ops@-bad.example' (invalid domain '-bad.example')",
        ),
        (
            "reply_to",
            ["Ops ops@example.com>"],
            "malformed address in reply_to[0]: 'Ops ops@example.com>'",
        ),
        ("from", {"address": "", "name": "Ops"}, "empty address in from: ''"),
        (
            "to",
            ["a..b@example.com"],
            "malformed address in to[0]: 'a..b@example.com' (invalid local part 'a..b')",
        ),
        ("to", [42], "to[0] must be an address string or an object with 'address', got 42"),
    ],
)
def test_c07_malformed_addresses_named(
    tmp_path: Path, home: Path, field: str, value: Any, line: str
) -> None:
    path = write_job(tmp_path, job(**{field: value}))
    result = run_mailer(path, "--check-config", env=offline_env(home))
    assert (result.code, result.lines) == (EX_DATAERR, [f"error: {line}"])


def test_missing_and_broken_job_files(tmp_path: Path, home: Path) -> None:
    missing = run_mailer(tmp_path / "absent.json", "--check-config", env=offline_env(home))
    assert (missing.code, missing.lines) == (
        EX_NOINPUT,
        [f"error: cannot read job file {tmp_path / 'absent.json'}: No such file or directory"],
    )
    broken = tmp_path / "broken.json"
    broken.write_text('{"name": "x",\n  "to": }', encoding="utf-8")
    result = run_mailer(broken, "--check-config", env=offline_env(home))
    assert (result.code, result.lines) == (
        EX_DATAERR,
        [f"error: job file {broken} is not valid JSON: Expecting value at line 2 column 9"],
    )
    not_object = tmp_path / "list.json"
    not_object.write_text("[]", encoding="utf-8")
    result = run_mailer(not_object, "--check-config", env=offline_env(home))
    assert (result.code, result.lines) == (
        EX_DATAERR,
        ["error: the job file must hold one JSON object"],
    )


def test_missing_template_file_is_no_input(tmp_path: Path, home: Path) -> None:
    path = write_job(tmp_path, job(text=None, html_file=str(tmp_path / "absent.html")))
    result = run_mailer(path, "--check-config", env=offline_env(home))
    assert (result.code, result.lines) == (
        EX_NOINPUT,
        [f"error: cannot read 'html_file' {tmp_path / 'absent.html'}: No such file or directory"],
    )


def test_usage_errors_exit_64(tmp_path: Path, home: Path) -> None:
    path = write_job(tmp_path, job())
    result = run_mailer(path, "--check-config", "--dry-run", env=offline_env(home))
    assert result.code == EX_USAGE
    assert "not allowed with argument" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_names_every_option(tmp_path: Path, home: Path) -> None:
    result = run_mailer(tmp_path / "x.json", "--help", env=offline_env(home))
    assert result.code == 0
    text = result.stdout.decode()
    for option in ("--job", "--check-config", "--dry-run", "--state-dir", "--log-level",
                   "--quiet", "--debug", "--version"):  # fmt: skip
        assert option in text
