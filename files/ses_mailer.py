#!/usr/bin/env python3
"""Send one mail job through Amazon SES v2 with the instance role's credentials.

A job is one JSON file (see docs/job-format.md): sender, recipients, subject,
text and/or HTML body, attachments, and optionally a command whose output is
mailed (command mode) or one personalised message per recipient
(per-recipient mode). Messages are built with the ``email`` package and sent as
raw MIME with SES v2 ``SendEmail``; credentials come only from boto3's default
chain (on EC2: the instance role through IMDSv2).

Everything is validated before the first send. Expected errors end the run
with one line on stderr and a sysexits code; ``--debug`` adds the traceback.
With a state directory, a journal makes each scheduled run send every message
once even when the run is restarted after a crash.

Python 3.9 or newer, standard library and boto3/botocore only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import difflib
import glob
import hashlib
import html
import json
import logging
import mimetypes
import os
import re
import shlex
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from email import policy as email_policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, Literal, NoReturn, cast

if TYPE_CHECKING:
    from mypy_boto3_sesv2 import SESV2Client

# botocore is imported on first use (noqa: PLC0415 below): --check-config must stay
# fast and must not depend on the SDK, and plain botocore starts faster than boto3.

__version__ = "1.0.0"
PROG = "ses-mailer"

# sysexits.h
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

MAX_MESSAGE_BYTES = 40_000_000  # SES v2: 40 MB, read conservatively as decimal megabytes
MAX_RECIPIENTS = 50  # SES: to + cc + bcc of one message
MAX_TAGS = 50
JOB_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
TAG_RE = re.compile(r"[A-Za-z0-9_-]{1,256}")
REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-\d{1,2}")
LOCAL_PART_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
DOMAIN_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
ACCESS_KEY_ID_RE = re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")
CREDENTIAL_KEY_RE = re.compile(
    r"access[_-]?key|secret|session[_-]?token|security[_-]?token|password|passwd|credential",
    re.IGNORECASE,
)
CREDENTIAL_TEXT_RE = re.compile(r"aws_secret_access_key|aws_session_token", re.IGNORECASE)
DAILY_QUOTA_RE = re.compile(r"daily|24[- ]?hour|sending quota", re.IGNORECASE)
THROTTLING_CODES = frozenset(
    {"Throttling", "ThrottlingException", "TooManyRequestsException", "RequestThrottled"}
)

# 7bit transfer encodings (SES and every relay accept them), CRLF line ends.
MIME_POLICY = email_policy.SMTP.clone(cte_type="7bit")

DEFAULT_COMMAND_TEXT = """\
Job: ${job} on ${host}
Command: ${command}
Exit status: ${exit_status}

${output}"""

BASE_PLACEHOLDERS = frozenset({"job", "host", "date", "datetime", "region", "instance_id"})
COMMAND_PLACEHOLDERS = frozenset({"command", "exit_status", "output"})
RECIPIENT_PLACEHOLDERS = frozenset({"recipient", "recipient_name"})

log = logging.getLogger(PROG)


class MailerError(Exception):
    """An expected failure: one line for the operator and a sysexits code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class Terminated(Exception):
    """The process received SIGTERM or SIGINT."""


# --------------------------------------------------------------------------
# The job model
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mailbox:
    """One address, with the domain already in its ASCII (punycode) form."""

    name: str
    username: str
    domain: str

    @property
    def addr_spec(self) -> str:
        return f"{self.username}@{self.domain}"

    def header(self) -> Address:
        return Address(self.name, self.username, self.domain)


@dataclasses.dataclass(frozen=True)
class CommandSpec:
    argv: tuple[str, ...]
    timeout: float
    send_when: str
    max_output_bytes: int


@dataclasses.dataclass(frozen=True)
class PerRecipientSpec:
    max_rate: float
    rate_from_quota: bool
    concurrency: int


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    sender: Mailbox
    to: tuple[Mailbox, ...]
    cc: tuple[Mailbox, ...]
    bcc: tuple[Mailbox, ...]
    reply_to: tuple[Mailbox, ...]
    subject: str
    text: str | None
    html: str | None
    attachments: tuple[str, ...]
    allow_missing_attachments: bool
    configuration_set: str | None
    tags: tuple[tuple[str, str], ...]
    region: str | None
    command: CommandSpec | None
    per_recipient: PerRecipientSpec | None
    retry_mode: str
    max_attempts: int
    connect_timeout: float
    read_timeout: float
    resume_window: int
    digest: str
    placeholders: frozenset[str]


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------

TOP_KEYS = (
    "name",
    "from",
    "to",
    "cc",
    "bcc",
    "reply_to",
    "subject",
    "text",
    "text_file",
    "html",
    "html_file",
    "attachments",
    "allow_missing_attachments",
    "configuration_set",
    "tags",
    "region",
    "command",
    "per_recipient",
    "retry",
    "connect_timeout",
    "read_timeout",
    "resume_window",
)
COMMAND_KEYS = ("argv", "timeout", "send_when", "max_output_bytes")
PER_RECIPIENT_KEYS = ("max_rate", "rate_from_quota", "concurrency")
RETRY_KEYS = ("mode", "max_attempts")
SEND_WHEN = ("always", "on_failure", "on_output")
RETRY_MODES = ("standard", "adaptive")


def _bad(message: str, code: int = EX_DATAERR) -> NoReturn:
    raise MailerError(message, code)


def find_credentials(value: Any, path: str = "") -> str | None:
    """Return the path of the first credential-shaped item in ``value``, or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if CREDENTIAL_KEY_RE.search(str(key)):
                return f"key {where!r}"
            found = find_credentials(item, where)
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = find_credentials(item, f"{path}[{index}]")
            if found:
                return found
    elif isinstance(value, str) and (
        ACCESS_KEY_ID_RE.search(value) or CREDENTIAL_TEXT_RE.search(value)
    ):
        return f"the value of {path or 'the job'!r}"
    return None


def _check_keys(obj: dict[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in obj:
        if key not in allowed:
            name = f"{where}.{key}" if where else key
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            _bad(f"unknown key {name!r} in the job file{hint}")


def _string(obj: dict[str, Any], key: str, where: str, required: bool = False) -> str | None:
    value = obj.get(key)
    name = f"{where}.{key}" if where else key
    if value is None:
        if required:
            _bad(f"{name!r} is required in the job file")
        return None
    if not isinstance(value, str):
        _bad(f"{name!r} must be a string, not {type(value).__name__}")
    return value


def _bool(obj: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = obj.get(key, default)
    if not isinstance(value, bool):
        _bad(f"{where + '.' if where else ''}{key!r} must be true or false")
    return value


def _number(
    obj: dict[str, Any],
    key: str,
    where: str,
    *,
    default: float,
    low: float,
    high: float,
    integer: bool = False,
) -> float:
    value = obj.get(key, default)
    name = f"{where}.{key}" if where else key
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _bad(f"{name!r} must be {kind}")
    if integer and not isinstance(value, int):
        _bad(f"{name!r} must be {kind}")
    if not low <= value <= high:
        _bad(f"{name!r} must be between {low:g} and {high:g}, not {value}")
    return float(value)


def _object(obj: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        _bad(f"{key!r} must be an object (a mapping)")
    return value


def parse_address(value: str, where: str) -> Mailbox:
    """Parse ``Name <user@domain>`` or ``user@domain`` strictly; punycode the domain."""
    text = value.strip()
    if not text:
        _bad(f"empty address in {where}: {value!r}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        _bad(f"malformed address in {where}: {value!r} (control character)")
    name = ""
    match = re.fullmatch(r"(.*?)\s*<([^<>]*)>", text, re.DOTALL)
    if match:
        name = match.group(1).strip()
        spec = match.group(2).strip()
        if len(name) >= 2 and name[0] == name[-1] == '"':
            name = name[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    elif "<" in text or ">" in text:
        _bad(f"malformed address in {where}: {value!r}")
    else:
        spec = text
    return make_mailbox(name, spec, value, where)


def make_mailbox(name: str, spec: str, original: str, where: str) -> Mailbox:
    """Check an addr-spec and display name; return the mailbox with a punycode domain."""
    if spec.count("@") != 1:
        _bad(f"malformed address in {where}: {original!r} (expected user@domain)")
    local, domain = spec.split("@")
    if not local or not domain:
        _bad(f"malformed address in {where}: {original!r} (expected user@domain)")
    if not local.isascii():
        _bad(f"address {original!r} in {where} has a non-ASCII local part: SES cannot send to it")
    if not LOCAL_PART_RE.fullmatch(local):
        _bad(f"malformed address in {where}: {original!r} (invalid local part {local!r})")
    try:
        ascii_domain = domain.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        _bad(f"malformed address in {where}: {original!r} (invalid domain {domain!r})")
    labels = ascii_domain.split(".")
    if len(labels) < 2 or not all(DOMAIN_LABEL_RE.fullmatch(label) for label in labels):
        _bad(f"malformed address in {where}: {original!r} (invalid domain {domain!r})")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        _bad(f"malformed display name in {where}: {original!r}")
    return Mailbox(name=name, username=local, domain=ascii_domain)


def _mailbox(value: Any, where: str) -> Mailbox:
    if isinstance(value, str):
        return parse_address(value, where)
    if isinstance(value, dict):
        _check_keys(value, ("address", "name"), where)
        spec = value.get("address")
        name = value.get("name", "")
        if not isinstance(spec, str) or not isinstance(name, str):
            _bad(f"{where}: 'address' and 'name' must be strings, got {value!r}")
        if not spec.strip():
            _bad(f"empty address in {where}: {spec!r}")
        return make_mailbox(name.strip(), spec.strip(), spec, where)
    _bad(f"{where} must be an address string or an object with 'address', got {value!r}")


def _mailbox_list(job: dict[str, Any], key: str) -> tuple[Mailbox, ...]:
    value = job.get(key)
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    boxes: list[Mailbox] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        box = _mailbox(item, f"{key}[{index}]" if isinstance(value, list) else key)
        if box.addr_spec.lower() in seen:
            continue
        seen.add(box.addr_spec.lower())
        boxes.append(box)
    return tuple(boxes)


def placeholders_in(text: str, where: str) -> set[str]:
    """Names used as ``$name``/``${name}`` in ``text``; a stray ``$`` is an error."""
    names: set[str] = set()
    for match in string.Template.pattern.finditer(text):
        if match.group("invalid") is not None:
            line = text.count("\n", 0, match.start()) + 1
            _bad(f"invalid placeholder in {where} (line {line}): use ${{name}}, or $$ for '$'")
        name = match.group("named") or match.group("braced")
        if name:
            names.add(name)
    return names


def _absolute_path(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        _bad(f"{where} must be a non-empty path string")
    if not os.path.isabs(value):
        _bad(f"{where} must be an absolute path, not {value!r}")
    return value


def _read_template(path: str, where: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError:
        _bad(f"{where} {path} is not valid UTF-8")
    except OSError as exc:
        _bad(f"cannot read {where} {path}: {exc.strerror}", EX_NOINPUT)


def _body(job: dict[str, Any], kind: str) -> str | None:
    inline = _string(job, kind, "")
    path = job.get(f"{kind}_file")
    if inline is not None and path is not None:
        _bad(f"give either {kind!r} or '{kind}_file', not both")
    if path is not None:
        return _read_template(_absolute_path(path, f"'{kind}_file'"), f"'{kind}_file'")
    return inline


def validate(raw: Any, digest: str) -> Job:
    """Turn the parsed job file into a Job, or raise MailerError naming the problem."""
    if not isinstance(raw, dict):
        _bad("the job file must hold one JSON object")
    found = find_credentials(raw)
    if found:
        _bad(
            f"the job file contains credential material ({found}): remove it; "
            "the mailer takes credentials only from the instance role",
            EX_CONFIG,
        )
    _check_keys(raw, TOP_KEYS, "")

    name = _string(raw, "name", "", required=True) or ""
    if not JOB_NAME_RE.fullmatch(name):
        _bad(f"'name' {name!r} must match [A-Za-z0-9][A-Za-z0-9_.@-]* (at most 64 characters)")
    if raw.get("from") is None:
        _bad("'from' is required in the job file")
    sender = _mailbox(raw["from"], "from")
    to, cc, bcc = (_mailbox_list(raw, key) for key in ("to", "cc", "bcc"))
    reply_to = _mailbox_list(raw, "reply_to")
    subject = _string(raw, "subject", "", required=True) or ""

    command = None
    section = _object(raw, "command")
    if section is not None:
        _check_keys(section, COMMAND_KEYS, "command")
        argv = section.get("argv")
        if (
            not isinstance(argv, list)
            or not argv
            or not all(isinstance(arg, str) for arg in argv)
            or not argv[0]
        ):
            _bad("'command.argv' must be a non-empty list of strings")
        send_when = _string(section, "send_when", "command") or "always"
        if send_when not in SEND_WHEN:
            _bad(f"'command.send_when' must be one of {', '.join(SEND_WHEN)}, not {send_when!r}")
        command = CommandSpec(
            argv=tuple(argv),
            timeout=_number(section, "timeout", "command", default=3600, low=1, high=7 * 86400),
            send_when=send_when,
            max_output_bytes=int(
                _number(
                    section,
                    "max_output_bytes",
                    "command",
                    default=1 << 20,
                    low=1024,
                    high=30_000_000,
                    integer=True,
                )
            ),
        )

    per_recipient = None
    section = _object(raw, "per_recipient")
    if section is not None:
        _check_keys(section, PER_RECIPIENT_KEYS, "per_recipient")
        per_recipient = PerRecipientSpec(
            max_rate=_number(
                section, "max_rate", "per_recipient", default=1, low=0.01, high=10_000
            ),
            rate_from_quota=_bool(section, "rate_from_quota", "per_recipient", False),
            concurrency=int(
                _number(
                    section, "concurrency", "per_recipient", default=4, low=1, high=32, integer=True
                )
            ),
        )
        if cc or bcc:
            _bad("'cc' and 'bcc' cannot be used with 'per_recipient' (each message has one 'to')")
        if not to:
            _bad("'per_recipient' needs at least one address in 'to'")

    recipients = len(to) + len(cc) + len(bcc)
    if recipients == 0:
        _bad("no recipients: give at least one address in 'to', 'cc' or 'bcc'")
    if per_recipient is None and recipients > MAX_RECIPIENTS:
        _bad(
            f"{recipients} recipients in one message; SES allows {MAX_RECIPIENTS} "
            "(to+cc+bcc): use 'per_recipient' or split the job"
        )

    text = _body(raw, "text")
    html_body = _body(raw, "html")
    if text is None and html_body is None:
        if command is None:
            _bad("no body: give 'text', 'text_file', 'html' or 'html_file'")
        text = DEFAULT_COMMAND_TEXT

    allowed = set(BASE_PLACEHOLDERS)
    if command is not None:
        allowed |= COMMAND_PLACEHOLDERS
    if per_recipient is not None:
        allowed |= RECIPIENT_PLACEHOLDERS
    used: set[str] = set()
    for where, value in (("subject", subject), ("text", text), ("html", html_body)):
        if value is None:
            continue
        names = placeholders_in(value, where)
        unknown = sorted(names - allowed)
        if unknown:
            _bad(
                f"unknown placeholder ${{{unknown[0]}}} in {where}; available here: "
                + ", ".join(sorted(allowed))
            )
        used |= names

    attachments_value = raw.get("attachments", [])
    if not isinstance(attachments_value, list):
        _bad("'attachments' must be a list of absolute paths or globs")
    attachments = tuple(
        _absolute_path(item, f"attachments[{index}]")
        for index, item in enumerate(attachments_value)
    )

    configuration_set = _string(raw, "configuration_set", "")
    if configuration_set is not None and not re.fullmatch(
        r"[A-Za-z0-9_-]{1,64}", configuration_set
    ):
        _bad(f"'configuration_set' {configuration_set!r} is not a valid configuration set name")

    tags_value = raw.get("tags", {})
    if not isinstance(tags_value, dict):
        _bad("'tags' must be a mapping of tag name to value")
    if len(tags_value) > MAX_TAGS:
        _bad(f"'tags' has {len(tags_value)} entries; SES allows {MAX_TAGS}")
    tags: list[tuple[str, str]] = []
    for key, value in tags_value.items():
        if not TAG_RE.fullmatch(key):
            _bad(f"tag name {key!r} must match [A-Za-z0-9_-] (1..256 characters)")
        if not isinstance(value, str) or not TAG_RE.fullmatch(value):
            _bad(f"value of tag {key!r} must be a string of [A-Za-z0-9_-] (1..256 characters)")
        tags.append((key, value))

    region = _string(raw, "region", "")
    if region is not None and not REGION_RE.fullmatch(region):
        _bad(f"'region' {region!r} is not an AWS region name")

    retry = _object(raw, "retry") or {}
    _check_keys(retry, RETRY_KEYS, "retry")
    retry_mode = _string(retry, "mode", "retry") or "standard"
    if retry_mode not in RETRY_MODES:
        _bad(f"'retry.mode' must be one of {', '.join(RETRY_MODES)}, not {retry_mode!r}")

    job = Job(
        name=name,
        sender=sender,
        to=to,
        cc=cc,
        bcc=bcc,
        reply_to=reply_to,
        subject=subject,
        text=text,
        html=html_body,
        attachments=attachments,
        allow_missing_attachments=_bool(raw, "allow_missing_attachments", "", False),
        configuration_set=configuration_set,
        tags=tuple(tags),
        region=region,
        command=command,
        per_recipient=per_recipient,
        retry_mode=retry_mode,
        max_attempts=int(
            _number(retry, "max_attempts", "retry", default=5, low=1, high=10, integer=True)
        ),
        connect_timeout=_number(raw, "connect_timeout", "", default=5, low=0.1, high=300),
        read_timeout=_number(raw, "read_timeout", "", default=30, low=0.1, high=900),
        resume_window=int(
            _number(raw, "resume_window", "", default=3600, low=0, high=7 * 86400, integer=True)
        ),
        digest=digest,
        placeholders=frozenset(used),
    )
    # Inline bodies alone must already fit; attachments are measured at send time.
    inline_size = len(job.subject) + len(job.text or "") + len(job.html or "")
    if inline_size * 4 // 3 > MAX_MESSAGE_BYTES:
        _bad(f"the bodies alone exceed the SES message limit of {MAX_MESSAGE_BYTES} bytes")
    return job


def load_job(path: str) -> Job:
    """Read, parse and validate a job file."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        _bad(f"cannot read job file {path}: {exc.strerror}", EX_NOINPUT)
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        _bad(f"job file {path} is not valid UTF-8")
    except json.JSONDecodeError as exc:
        _bad(
            f"job file {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        )
    return validate(raw, hashlib.sha256(data).hexdigest())


# --------------------------------------------------------------------------
# Environment: region, instance metadata
# --------------------------------------------------------------------------


def read_instance_metadata(path: str) -> str | None:
    """Read one metadata path through IMDSv2, or None when unavailable.

    botocore's fetcher honours AWS_EC2_METADATA_SERVICE_ENDPOINT,
    AWS_EC2_METADATA_DISABLED and the IMDSv1 switch, exactly as it does for the
    instance role's credentials.
    """
    import botocore.session  # noqa: PLC0415
    from botocore import exceptions as bce  # noqa: PLC0415
    from botocore.utils import IMDSFetcher  # noqa: PLC0415

    class MetadataReader(IMDSFetcher):
        def read(self, url_path: str) -> str | None:
            fetcher: Any = self  # botocore's token and request helpers are not in its stubs
            try:
                token = fetcher._fetch_metadata_token()
                response = fetcher._get_request(url_path, None, token)
            except (fetcher._RETRIES_EXCEEDED_ERROR_CLS, bce.BotoCoreError):
                return None
            value = str(response.text).strip()
            return value or None

    session = botocore.session.get_session()
    config = {
        key: session.get_config_variable(key)
        for key in (
            "ec2_metadata_service_endpoint",
            "ec2_metadata_service_endpoint_mode",
            "ec2_metadata_v1_disabled",
        )
    }
    return MetadataReader(timeout=2, num_attempts=2, config=config).read(path)


def resolve_region(job: Job) -> str:
    """The job's region, else the environment, else the config file, else IMDS."""
    for source, value in (
        ("job", job.region),
        ("AWS_REGION", os.environ.get("AWS_REGION")),
        ("AWS_DEFAULT_REGION", os.environ.get("AWS_DEFAULT_REGION")),
    ):
        if value:
            log.debug("region %s from %s", value, source)
            return value
    import botocore.session  # noqa: PLC0415

    configured = botocore.session.get_session().get_config_variable("region")
    if isinstance(configured, str) and configured:
        log.debug("region %s from the AWS config file", configured)
        return configured
    from_imds = read_instance_metadata("latest/meta-data/placement/region")
    if from_imds and REGION_RE.fullmatch(from_imds):
        log.debug("region %s from the instance metadata", from_imds)
        return from_imds
    _bad(
        "no region: set region in the job or AWS_REGION, or run on EC2 with instance "
        "metadata reachable",
        EX_CONFIG,
    )


# --------------------------------------------------------------------------
# Command mode
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CommandResult:
    status: str
    failed: bool
    output: str


def run_command(spec: CommandSpec) -> CommandResult:
    """Run the job's command with merged output; never raises for the command's failure."""
    log.info("running command: %s", shlex.join(spec.argv))
    try:
        process = subprocess.Popen(
            spec.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return CommandResult(f"could not start: {exc.strerror}", True, "")
    timed_out = False
    try:
        try:
            data, _ = process.communicate(timeout=spec.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGKILL)
            data, _ = process.communicate()
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    if len(data) > spec.max_output_bytes:
        dropped = len(data) - spec.max_output_bytes
        data = (
            f"[first {dropped} bytes of output dropped]\n".encode() + data[-spec.max_output_bytes :]
        )
    output = data.decode("utf-8", errors="replace")
    code = process.returncode
    if timed_out:
        status = f"timed out after {spec.timeout:g} s"
    elif code < 0:
        status = f"killed by signal {-code}"
    else:
        status = str(code)
    failed = timed_out or code != 0
    level = logging.WARNING if failed else logging.INFO
    log.log(level, "command finished: exit status %s, %d bytes of output", status, len(data))
    return CommandResult(status, failed, output)


def should_send(spec: CommandSpec, result: CommandResult) -> bool:
    if spec.send_when == "on_failure":
        return result.failed
    if spec.send_when == "on_output":
        return result.output != ""
    return True


# --------------------------------------------------------------------------
# Building messages
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Attachment:
    filename: str
    data: bytes
    maintype: str
    subtype: str


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """One message to send: its journal key and its envelope recipients."""

    key: str
    to: tuple[Mailbox, ...]
    cc: tuple[Mailbox, ...]
    bcc: tuple[Mailbox, ...]
    values: dict[str, str]

    @property
    def label(self) -> str:
        boxes = (*self.to, *self.cc, *self.bcc)
        if self.key.startswith("to:"):
            return f"to {boxes[0].addr_spec}"
        return f"to {len(boxes)} recipient(s)"


def load_attachments(job: Job) -> list[Attachment]:
    found: list[Attachment] = []
    for pattern in job.attachments:
        if glob.has_magic(pattern):
            paths = sorted(path for path in glob.glob(pattern) if os.path.isfile(path))
        else:
            paths = [pattern] if os.path.exists(pattern) else []
        if not paths:
            if job.allow_missing_attachments:
                log.warning("attachment %s matches no file: skipped", pattern)
                continue
            _bad(f"attachment {pattern} matches no file", EX_NOINPUT)
        for path in paths:
            try:
                with open(path, "rb") as handle:
                    data = handle.read()
            except OSError as exc:
                _bad(f"cannot read attachment {path}: {exc.strerror}", EX_NOINPUT)
            ctype, encoding = mimetypes.guess_type(path)
            if ctype is None or encoding is not None:
                ctype = "application/octet-stream"
            maintype, subtype = ctype.split("/", 1)
            found.append(Attachment(os.path.basename(path), data, maintype, subtype))
    return found


def render(template: str, values: dict[str, str], escape: bool = False) -> str:
    if escape:
        values = {key: html.escape(value) for key, value in values.items()}
    return string.Template(template).substitute(values)


def build_message(job: Job, item: Outgoing, attachments: Sequence[Attachment], date: str) -> bytes:
    """The raw MIME bytes of one message; Bcc never appears in a header."""
    message = EmailMessage(policy=MIME_POLICY)
    message["From"] = job.sender.header()
    if item.to:
        message["To"] = [box.header() for box in item.to]
    if item.cc:
        message["Cc"] = [box.header() for box in item.cc]
    if job.reply_to:
        message["Reply-To"] = [box.header() for box in job.reply_to]
    subject = " ".join(render(job.subject, item.values).split())
    message["Subject"] = subject
    message["Date"] = date
    message["Auto-Submitted"] = "auto-generated"
    if job.text is not None:
        message.set_content(render(job.text, item.values), subtype="plain", charset="utf-8")
        if job.html is not None:
            message.add_alternative(
                render(job.html, item.values, escape=True), subtype="html", charset="utf-8"
            )
    elif job.html is not None:
        message.set_content(
            render(job.html, item.values, escape=True), subtype="html", charset="utf-8"
        )
    for attachment in attachments:
        message.add_attachment(
            attachment.data,
            maintype=attachment.maintype,
            subtype=attachment.subtype,
            filename=attachment.filename,
        )
    for part in message.walk():
        if part is not message:
            del part["MIME-Version"]  # the email package repeats it in subparts
    data = message.as_bytes()
    if len(data) > MAX_MESSAGE_BYTES:
        _bad(
            f"message {item.label} is {len(data)} bytes after encoding; the SES limit is "
            f"{MAX_MESSAGE_BYTES} bytes"
        )
    return data


def plan_messages(job: Job, values: dict[str, str]) -> list[Outgoing]:
    if job.per_recipient is None:
        return [Outgoing("message", job.to, job.cc, job.bcc, values)]
    return [
        Outgoing(
            f"to:{box.addr_spec.lower()}",
            (box,),
            (),
            (),
            {**values, "recipient": box.addr_spec, "recipient_name": box.name},
        )
        for box in job.to
    ]


# --------------------------------------------------------------------------
# Exactly once: the run journal
# --------------------------------------------------------------------------


class Journal:
    """Append-only record of one scheduled run; fsync'd after every line."""

    def __init__(self, state_dir: str, job: Job) -> None:
        self.path = os.path.join(state_dir, f"{job.name}.journal")
        self.job = job
        self.lock = threading.Lock()
        self.handle: Any = None

    def resume(self, now: float) -> set[str]:
        """Keys already sent by an unfinished run of this job file, if one may be resumed."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except FileNotFoundError:
            return set()
        except OSError as exc:
            _bad(f"cannot read journal {self.path}: {exc.strerror}", EX_CANTCREAT)
        records: list[dict[str, Any]] = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash
            if isinstance(record, dict):
                records.append(record)
        header = records[0] if records else {}
        started = header.get("started")
        age = now - started if isinstance(started, (int, float)) else None
        same_job = header.get("digest") == self.job.digest
        if not same_job or age is None or not 0 <= age <= self.job.resume_window:
            reason = "too old" if same_job else "another job file content"
            log.warning("unfinished journal %s set aside (%s); starting afresh", self.path, reason)
            self._set_aside(".stale")
            return set()
        last: dict[str, str] = {}
        for record in records:
            if record.get("event") in ("try", "sent", "refused"):
                last[str(record.get("key"))] = str(record["event"])
        sent = {key for key, event in last.items() if event == "sent"}
        for key in sorted(key for key, event in last.items() if event == "try"):
            log.warning(
                "message %s was being sent when the previous run stopped; sending it again "
                "(it may arrive twice)",
                key,
            )
        log.info(
            "resuming the unfinished run started %.0f s ago: %d message(s) already sent",
            age,
            len(sent),
        )
        self._open(append=True)
        return sent

    def _set_aside(self, suffix: str) -> None:
        try:
            os.replace(self.path, self.path + suffix)
        except OSError as exc:
            _bad(f"cannot move journal {self.path}: {exc.strerror}", EX_CANTCREAT)

    def _open(self, append: bool) -> None:
        try:
            fd = os.open(
                self.path,
                os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC),
                0o600,
            )
            self.handle = os.fdopen(fd, "a", encoding="utf-8")
        except OSError as exc:
            _bad(f"cannot write journal {self.path}: {exc.strerror}", EX_CANTCREAT)

    def start(self, now: float) -> None:
        if self.handle is None:
            self._open(append=False)
            self._write(
                {
                    "event": "start",
                    "job": self.job.name,
                    "digest": self.job.digest,
                    "started": now,
                    "pid": os.getpid(),
                }
            )

    def _write(self, record: dict[str, Any]) -> None:
        with self.lock:
            try:
                self.handle.write(json.dumps(record, sort_keys=True) + "\n")
                self.handle.flush()
                os.fsync(self.handle.fileno())
            except OSError as exc:
                _bad(f"cannot write journal {self.path}: {exc.strerror}", EX_CANTCREAT)

    def tried(self, key: str) -> None:
        self._write({"event": "try", "key": key, "at": time.time()})

    def refused(self, key: str) -> None:
        self._write({"event": "refused", "key": key, "at": time.time()})

    def sent(self, key: str, message_id: str) -> None:
        self._write({"event": "sent", "key": key, "message_id": message_id, "at": time.time()})

    def finish(self) -> None:
        """Close the run: the next run starts afresh."""
        if self.handle is not None:
            self._write({"event": "done", "at": time.time()})
            self.handle.close()
            self.handle = None
            self._set_aside(".last")

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


# --------------------------------------------------------------------------
# Sending
# --------------------------------------------------------------------------


def is_daily_quota(code: str, message: str) -> bool:
    """SES reports the 24-hour quota with codes botocore would retry."""
    if code == "LimitExceededException":
        return True
    return code in THROTTLING_CODES | {"MessageRejected"} and bool(DAILY_QUOTA_RE.search(message))


def no_retry_on_daily_quota(response: Any = None, operation: Any = None, **_: Any) -> None:
    """``needs-retry`` handler run before botocore's retry handler.

    A daily-quota answer ends the call at once by raising it as the ClientError
    botocore would raise after its retries. (Returning False would veto the retry
    only on botocore >= 1.31; older versions sleep(False) and retry forever.)
    """
    if response is None:
        return
    parsed = response[1]
    error = parsed.get("Error", {}) if isinstance(parsed, dict) else {}
    if is_daily_quota(str(error.get("Code", "")), str(error.get("Message", ""))):
        from botocore.exceptions import ClientError  # noqa: PLC0415

        log.debug("daily quota error: not retried")
        raise ClientError(parsed, getattr(operation, "name", "SendEmail"))


def make_client(job: Job, region: str, service: str = "sesv2", pool: int = 10) -> Any:
    """A client with the job's retry mode and attempts, timeouts and the quota veto."""
    import botocore.session  # noqa: PLC0415
    from botocore.config import Config  # noqa: PLC0415

    mode = cast("Literal['standard', 'adaptive']", job.retry_mode)
    config = Config(
        retries={"mode": mode, "total_max_attempts": job.max_attempts},
        connect_timeout=job.connect_timeout,
        read_timeout=job.read_timeout,
        max_pool_connections=max(pool, 10),
        user_agent_extra=f"{PROG}/{__version__}",
    )
    # botocore reads these itself only from 1.31 on; Debian 12 ships 1.29.
    endpoint = os.environ.get(f"AWS_ENDPOINT_URL_{service.upper()}") or os.environ.get(
        "AWS_ENDPOINT_URL"
    )
    session = botocore.session.get_session()
    client: Any = session.create_client(
        service, region_name=region, config=config, endpoint_url=endpoint or None
    )
    client.meta.events.register_first(f"needs-retry.{service}", no_retry_on_daily_quota)
    return client


class Pacer:
    """Start at most ``rate`` calls per second, spaced evenly."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next_slot = time.monotonic()
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            slot = max(self.next_slot, now)
            self.next_slot = slot + self.interval
        delay = slot - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def account_send_rate(job: Job, region: str) -> float:
    """MaxSendRate from SES v2 GetAccount, else from SES GetSendQuota."""
    from botocore.exceptions import ClientError  # noqa: PLC0415

    try:
        account = make_client(job, region).get_account()
        rate = float(account["SendQuota"]["MaxSendRate"])
    except ClientError as exc:
        log.debug("GetAccount failed (%s); asking GetSendQuota", exc)
        rate = float(make_client(job, region, "ses").get_send_quota()["MaxSendRate"])
    log.info("account sending rate: %g messages/s", rate)
    return rate


@dataclasses.dataclass
class Context:
    """What the error mapper needs to name in its one line."""

    job: Job | None = None
    region: str | None = None
    action: str = "ses:SendEmail"
    sent: int = 0
    total: int = 0


def send_all(
    job: Job,
    *,
    region: str,
    items: list[Outgoing],
    attachments: list[Attachment],
    date: str,
    journal: Journal | None,
    ctx: Context,
) -> None:
    """Send the planned messages, paced and concurrent in per-recipient mode."""
    from botocore.exceptions import ClientError  # noqa: PLC0415

    concurrency = 1
    pacer: Pacer | None = None
    if job.per_recipient is not None:
        rate = job.per_recipient.max_rate
        if job.per_recipient.rate_from_quota:
            ctx.action = "ses:GetAccount"
            quota_rate = account_send_rate(job, region)
            if quota_rate > 0:
                rate = min(rate, quota_rate)
        pacer = Pacer(rate)
        concurrency = min(job.per_recipient.concurrency, len(items)) or 1
        log.info(
            "per-recipient mode: %d message(s) at most %g/s, %d at once",
            len(items),
            rate,
            concurrency,
        )
    ctx.action = "ses:SendEmail"
    client: SESV2Client = make_client(job, region, pool=concurrency)
    stop = threading.Event()
    counter_lock = threading.Lock()

    def send_one(item: Outgoing) -> None:
        if stop.is_set():
            return
        data = build_message(job, item, attachments, date)
        if pacer is not None:
            pacer.wait()
            if stop.is_set():
                return
        destination: dict[str, list[str]] = {}
        for field, boxes in (
            ("ToAddresses", item.to),
            ("CcAddresses", item.cc),
            ("BccAddresses", item.bcc),
        ):
            if boxes:
                destination[field] = [box.addr_spec for box in boxes]
        request: dict[str, Any] = {
            "FromEmailAddress": job.sender.addr_spec,
            "Destination": destination,
            "Content": {"Raw": {"Data": data}},
        }
        if job.configuration_set:
            request["ConfigurationSetName"] = job.configuration_set
        if job.tags:
            request["EmailTags"] = [{"Name": k, "Value": v} for k, v in job.tags]
        if journal is not None:
            journal.tried(item.key)
        try:
            response = client.send_email(**request)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
            if journal is not None and status < 500:  # a definite no: not ambiguous later
                journal.refused(item.key)
            raise
        message_id = response["MessageId"]
        if journal is not None:
            journal.sent(item.key, message_id)
        with counter_lock:
            ctx.sent += 1
        log.info("message %s accepted by SES: MessageId %s", item.label, message_id)

    if concurrency == 1:
        for item in items:
            send_one(item)
        return
    errors: list[BaseException] = []
    with concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix=PROG) as pool:
        futures = [pool.submit(send_one, item) for item in items]
        try:
            for future in concurrent.futures.as_completed(futures):
                error = future.exception()
                if error is not None:
                    stop.set()
                    errors.append(error)
        except BaseException:  # SIGTERM while waiting: send nothing more
            stop.set()
            for future in futures:
                future.cancel()
            raise
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def run(args: argparse.Namespace, ctx: Context) -> int:
    """Validate the job, then run its command and send its messages."""
    job = load_job(args.job)
    ctx.job = job
    if args.check_config:
        log.info("job %s: configuration is valid", job.name)
        return EX_OK

    started = time.time()
    now = datetime.datetime.now().astimezone()
    region = (job.region or "") if args.dry_run else resolve_region(job)
    ctx.region = region

    journal: Journal | None = None
    done: set[str] = set()
    if not args.dry_run:
        if args.state_dir:
            journal = Journal(args.state_dir, job)
            done = journal.resume(started)
        else:
            log.info("no state directory: a restarted run may send its messages again")

    values = {
        "job": job.name,
        "host": socket.gethostname(),
        "date": now.strftime("%Y-%m-%d"),
        "datetime": now.isoformat(timespec="seconds"),
        "region": region,
        "instance_id": "",
    }
    if "instance_id" in job.placeholders:
        instance_id = read_instance_metadata("latest/meta-data/instance-id")
        if instance_id is None:
            log.warning("instance id not available from the instance metadata: using 'unknown'")
        values["instance_id"] = instance_id or "unknown"

    items = [item for item in plan_messages(job, values) if item.key not in done]
    if not items:
        log.info("job %s: every message of this run was already sent", job.name)
        if journal is not None:
            journal.finish()
        return EX_OK

    if job.command is not None:
        result = run_command(job.command)
        if not should_send(job.command, result):
            log.info(
                "job %s: command exit status %s, %s output: nothing to send (send_when %s)",
                job.name,
                result.status,
                "with" if result.output else "no",
                job.command.send_when,
            )
            if journal is not None:
                journal.finish()
            return EX_OK
        extra = {
            "command": shlex.join(job.command.argv),
            "exit_status": result.status,
            "output": result.output,
        }
        items = [dataclasses.replace(item, values={**item.values, **extra}) for item in items]

    attachments = load_attachments(job)
    date = formatdate(localtime=True)
    sizes = [len(build_message(job, item, attachments, date)) for item in items]
    ctx.total = len(items)

    if args.dry_run:
        out = sys.stdout.buffer
        for index, item in enumerate(items, 1):
            envelope = [box.addr_spec for box in (*item.to, *item.cc, *item.bcc)]
            log.info(
                "dry run: message %d of %d, envelope from %s to %s (%d bytes)",
                index,
                len(items),
                job.sender.addr_spec,
                ", ".join(envelope),
                sizes[index - 1],
            )
            if len(items) > 1:
                out.write(f"--- {PROG} dry run: message {index} of {len(items)} ---\r\n".encode())
            out.write(build_message(job, item, attachments, date))
            out.flush()
        log.info("dry run: %d message(s) not sent", len(items))
        return EX_OK

    log.info(
        "job %s: sending %d message(s) from %s via SES in %s",
        job.name,
        len(items),
        job.sender.addr_spec,
        region,
    )
    if journal is not None:
        journal.start(started)
    try:
        send_all(
            job,
            region=region,
            items=items,
            attachments=attachments,
            date=date,
            journal=journal,
            ctx=ctx,
        )
    finally:
        if journal is not None and ctx.sent < ctx.total:
            journal.close()
    if journal is not None:
        journal.finish()
    log.info("job %s: %d message(s) sent in %.1f s", job.name, ctx.sent, time.time() - started)
    return EX_OK


# --------------------------------------------------------------------------
# Errors: one line each
# --------------------------------------------------------------------------


def explain(exc: BaseException, ctx: Context) -> MailerError:
    """Map any failure to one line and an exit code."""
    if isinstance(exc, MailerError):
        return exc
    if isinstance(exc, Terminated):
        return MailerError(f"terminated by {exc}", EX_TEMPFAIL)
    bce: Any = sys.modules.get("botocore.exceptions")
    if bce is None:  # botocore never loaded: not an SDK error
        return MailerError(f"unexpected error: {exc!r} (rerun with --debug)", EX_SOFTWARE)
    region = ctx.region or "?"
    sender = ctx.job.sender.addr_spec if ctx.job else "?"
    profile_hint = (
        "attach an instance profile to this instance and check that IMDSv2 is reachable "
        "(metadata enabled, hop limit 2 when the program runs in a container, "
        "AWS_EC2_METADATA_DISABLED unset)"
    )
    if isinstance(exc, bce.NoCredentialsError):
        return MailerError(f"no AWS credentials found: {profile_hint}", EX_CONFIG)
    if isinstance(exc, bce.CredentialRetrievalError):
        return MailerError(f"cannot get AWS credentials ({exc}): {profile_hint}", EX_CONFIG)
    if isinstance(
        exc,
        (
            bce.EndpointConnectionError,
            bce.ConnectionClosedError,
            bce.ConnectTimeoutError,
            bce.ReadTimeoutError,
        ),
    ):
        return MailerError(f"cannot reach SES in {region}: {exc}", EX_TEMPFAIL)
    if isinstance(exc, bce.ClientError):
        return explain_client_error(exc, ctx, region, sender)
    if isinstance(exc, bce.BotoCoreError):
        return MailerError(f"AWS SDK error: {exc}", EX_UNAVAILABLE)
    return MailerError(f"unexpected error: {exc!r} (rerun with --debug)", EX_SOFTWARE)


def explain_client_error(exc: Any, ctx: Context, region: str, sender: str) -> MailerError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    message = " ".join(str(error.get("Message", "")).split())[:400]  # one line, bounded
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    attempts = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
    left = f" ({ctx.sent} of {ctx.total} sent before)" if ctx.total > 1 else ""
    if is_daily_quota(code, message):
        return MailerError(
            f"SES daily sending quota exhausted in {region} ({code}: {message}); not retried, "
            f"a later run can send the rest{left}",
            EX_TEMPFAIL,
        )
    if code in THROTTLING_CODES or status == 429:
        return MailerError(
            f"SES throttled {ctx.action} in {region} after {attempts} attempt(s) "
            f"({code}: {message}){left}",
            EX_TEMPFAIL,
        )
    if code in ("ExpiredToken", "ExpiredTokenException", "RequestExpired"):
        return MailerError(f"the instance role's credentials expired ({message})", EX_TEMPFAIL)
    if code in (
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "InvalidSignatureException",
    ):
        return MailerError(
            f"SES rejected the credentials ({code}): check the instance profile", EX_NOPERM
        )
    if code in ("AccessDenied", "AccessDeniedException") or status == 403:
        match = re.search(r"perform:\s*([a-z0-9-]+:[A-Za-z0-9*]+)", message)
        action = match.group(1) if match else ctx.action
        return MailerError(
            f"access denied for {action} in {region} (sender {sender}): the instance "
            f"profile's role policy must allow {action}",
            EX_NOPERM,
        )
    lowered = message.lower()
    if code == "MessageRejected" and (
        "not verified" in lowered or "did not have authority" in lowered
    ):
        failed = set(re.findall(r"[^\s,:;<>]+@[^\s,:;<>]+", message))
        others = sorted(addr for addr in failed if addr.lower() != sender.lower())
        if others and sender.lower() not in {addr.lower() for addr in failed}:
            return MailerError(
                f"recipient(s) {', '.join(others)} not verified in {region}: the account is "
                "in the SES sandbox there (verify them or request production access)",
                EX_CONFIG,
            )
        return MailerError(
            f"sender {sender} is not verified in {region}: verify the address or its "
            "domain as an SES identity in that region, or set the job's region to where "
            "it is verified",
            EX_CONFIG,
        )
    if code == "MailFromDomainNotVerifiedException":
        return MailerError(
            f"the MAIL FROM domain of {sender} is not verified in {region}", EX_CONFIG
        )
    if code == "NotFoundException":
        what = (
            f"configuration set {ctx.job.configuration_set}"
            if ctx.job and ctx.job.configuration_set
            else "a resource"
        )
        return MailerError(f"{what} not found in {region} ({message})", EX_CONFIG)
    if code in ("AccountSuspendedException", "SendingPausedException"):
        return MailerError(
            f"SES sending is paused for this account in {region}: {message}", EX_UNAVAILABLE
        )
    if code in ("BadRequestException", "InvalidParameterValue", "ValidationError"):
        return MailerError(f"SES refused the request as invalid: {message}", EX_DATAERR)
    if status >= 500:
        return MailerError(
            f"SES failed in {region} after {attempts} attempt(s): {code}: {message}{left}",
            EX_TEMPFAIL,
        )
    return MailerError(
        f"SES refused {ctx.action} in {region}: {code}: {message}{left}", EX_UNAVAILABLE
    )


# --------------------------------------------------------------------------
# Logging and the command line
# --------------------------------------------------------------------------

SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def stderr_is_journal() -> bool:
    """True when stderr is the stream systemd connected to the journal."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        info = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


class LineFormatter(logging.Formatter):
    """``level: message``, each line with a syslog priority prefix for the journal."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname.lower()}: {record.getMessage()}"
        if not self.journal:
            return text
        prefix = f"<{SYSLOG_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in text.splitlines())


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter(stderr_is_journal()))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Send one mail job (a JSON file) through Amazon SES v2.",
        epilog="Exit codes follow sysexits: 0 ok, 64 usage, 65 bad job file, 66 missing input, "
        "69 unavailable, 73 journal not writable, 75 temporary, 77 permission, 78 configuration.",
    )
    parser.add_argument("--job", required=True, metavar="FILE", help="the job file (JSON)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--check-config",
        action="store_true",
        help="validate the job file and exit; no network access, no credentials, no command run",
    )
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="build the messages (running the command in command mode) and print their MIME "
        "to stdout; send nothing",
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        default=(os.environ.get("STATE_DIRECTORY") or "").split(":")[0] or None,
        help="directory of the run journal that makes a restarted run send only what is left "
        "(default: first entry of $STATE_DIRECTORY)",
    )
    level = parser.add_mutually_exclusive_group()
    level.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="lowest level logged to stderr (default: info)",
    )
    level.add_argument(
        "--quiet", action="store_true", help="log only warnings and errors (--log-level warning)"
    )
    parser.add_argument(
        "--debug", action="store_true", help="log at debug level and show tracebacks of errors"
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {__version__}",
        help="print the version and exit",
    )
    return parser.parse_args(argv)


def _on_signal(signum: int, _frame: Any) -> None:
    raise Terminated(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return a sysexits code. Errors end here, as one line."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version exit 0, usage errors 2
        return EX_OK if exc.code in (0, None) else EX_USAGE
    setup_logging("debug" if args.debug else "warning" if args.quiet else args.log_level)
    signal.signal(signal.SIGTERM, _on_signal)
    ctx = Context()
    try:
        return run(args, ctx)
    except (Exception, Terminated, KeyboardInterrupt) as exc:  # noqa: BLE001 - the one place
        if isinstance(exc, KeyboardInterrupt):
            exc = Terminated("SIGINT")
        failure = explain(exc, ctx)
        log.error("%s", re.sub(r"\s*[\r\n]+\s*", " ", failure.message))  # one line
        if args.debug:
            log.debug("traceback:\n%s", traceback.format_exc().rstrip())
        return failure.code
    finally:
        for handler in log.handlers:
            handler.flush()


if __name__ == "__main__":
    sys.exit(main())
