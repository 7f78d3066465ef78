"""The rendered SES send policy: exact content for several inputs, parliament clean."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.iam.iamlab import REPO, policy_plugin
from tests.safety import loopback_env

plugin = policy_plugin()
PARLIAMENT = REPO / ".venv" / "bin" / "parliament"
ACCOUNT = "123456789012"
ARN = f"arn:aws:ses:eu-west-1:{ACCOUNT}"
SEND = ["ses:SendEmail", "ses:SendRawEmail"]


def render(addresses: list[str], domains: list[str], **kwargs: Any) -> dict[str, Any]:
    result: dict[str, Any] = plugin.ses_iam_send_policy(
        addresses, domains, partition="aws", account_id=ACCOUNT, region="eu-west-1", **kwargs
    )
    return result


CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "one address": (
        render(["mailer@example.com"], []),
        {
            "Version": "2012-10-17",
            "Statement": [{
                "Sid": "SendFromAllowedSenders",
                "Effect": "Allow",
                "Action": SEND,
                "Resource": f"{ARN}:identity/mailer@example.com",
                "Condition": {"StringLike": {"ses:FromAddress": "mailer@example.com"}},
            }],
        },
    ),
    "address whose domain identity exists": (
        render(["Mailer@Example.com"], [], known_identities=["example.com", "other.org"]),
        {
            "Version": "2012-10-17",
            "Statement": [{
                "Sid": "SendFromAllowedSenders",
                "Effect": "Allow",
                "Action": SEND,
                "Resource": [f"{ARN}:identity/example.com", f"{ARN}:identity/mailer@example.com"],
                "Condition": {"StringLike": {"ses:FromAddress": "mailer@example.com"}},
            }],
        },
    ),
    "addresses, domain, configuration set, recipients, quota pacing": (
        render(
            ["ops@example.com", "alerts@example.org"],
            ["example.org"],
            configuration_set="mailer-events",
            recipient_patterns=["*@example.com", "oncall@example.net"],
            quota_pacing=True,
        ),
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "SendFromAllowedSenders",
                    "Effect": "Allow",
                    "Action": SEND,
                    "Resource": [
                        f"{ARN}:identity/alerts@example.org",
                        f"{ARN}:identity/example.org",
                        f"{ARN}:identity/ops@example.com",
                        f"{ARN}:configuration-set/mailer-events",
                    ],
                    "Condition": {
                        "StringLike": {
                            "ses:FromAddress": ["*@example.org", "alerts@example.org",
                                                "ops@example.com"],
                        },
                        "ForAllValues:StringLike": {
                            "ses:Recipients": ["*@example.com", "oncall@example.net"],
                        },
                    },
                },
                {
                    "Sid": "ReadSendQuota",
                    "Effect": "Allow",
                    "Action": ["ses:GetAccount", "ses:GetSendQuota"],
                    "Resource": "*",
                },
            ],
        },
    ),
    "domain only, China partition": (
        plugin.ses_iam_send_policy(
            [], ["example.cn"], partition="aws-cn", account_id=ACCOUNT, region="cn-north-1"
        ),
        {
            "Version": "2012-10-17",
            "Statement": [{
                "Sid": "SendFromAllowedSenders",
                "Effect": "Allow",
                "Action": SEND,
                "Resource": f"arn:aws-cn:ses:cn-north-1:{ACCOUNT}:identity/example.cn",
                "Condition": {"StringLike": {"ses:FromAddress": "*@example.cn"}},
            }],
        },
    ),
}


def parliament(document: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PARLIAMENT), "--string", json.dumps(document)],
        env=loopback_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_policy_has_exact_content(case: str) -> None:
    rendered, expected = CASES[case]
    assert rendered == expected


@pytest.mark.parametrize("case", sorted(CASES))
def test_policy_passes_parliament_with_no_finding(case: str) -> None:
    result = parliament(CASES[case][0])
    assert (result.returncode, result.stdout) == (0, ""), result.stderr


def test_parliament_gate_reports_even_low_findings() -> None:
    """The gate can fail: ses:* on * is only a LOW finding, and it still fails."""
    result = parliament({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "ses:*", "Resource": "*"}]})
    assert result.returncode == 1
    assert result.stdout.startswith("LOW")


def test_only_send_actions_without_quota_pacing() -> None:
    for rendered, _ in CASES.values():
        actions = {a for s in rendered["Statement"] for a in s["Action"]}
        assert actions <= {"ses:SendEmail", "ses:SendRawEmail", "ses:GetAccount",
                           "ses:GetSendQuota"}
        stars = [s for s in rendered["Statement"] if s["Resource"] == "*"]
        assert all(set(s["Action"]) == {"ses:GetAccount", "ses:GetSendQuota"} for s in stars)


def test_trust_policy_lets_only_ec2_assume_the_role() -> None:
    assert plugin.ses_iam_trust_policy() == {
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "Ec2AssumeRole",
            "Effect": "Allow",
            "Principal": {"Service": "ec2.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }],
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sender_addresses": [], "sender_domains": []}, "at least one sender"),
        ({"sender_addresses": ["a@example.com"], "sender_domains": [], "account_id": "12"},
         "account id must be 12 digits"),
    ],
)
def test_policy_refuses_bad_input(kwargs: dict[str, Any], message: str) -> None:
    args = {"partition": "aws", "account_id": ACCOUNT, "region": "eu-west-1", **kwargs}
    with pytest.raises(ValueError, match=message):
        plugin.ses_iam_send_policy(args.pop("sender_addresses"), args.pop("sender_domains"),
                                   **args)


def test_partition_comes_from_the_caller_arn() -> None:
    assert plugin.ses_iam_partition("arn:aws-us-gov:iam::123456789012:user/x") == "aws-us-gov"
    with pytest.raises(ValueError, match="not an ARN"):
        plugin.ses_iam_partition("user/x")


def test_unverified_senders_are_covered_by_address_or_domain() -> None:
    verified = ["ops@example.com", "example.org"]
    assert plugin.ses_iam_unverified_senders(
        ["ops@example.com", "news@example.org", "x@example.net"], ["example.org", "example.de"],
        verified,
    ) == ["x@example.net", "example.de"]


@pytest.mark.parametrize("role", ["ses_iam", "ses_instance"])
def test_argument_spec_agrees_with_defaults(role: str) -> None:
    base = Path(REPO, "roles", role)
    defaults = yaml.safe_load((base / "defaults" / "main.yml").read_text())
    specs = yaml.safe_load((base / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    options = specs["main"]["options"]
    assert sorted(options) == sorted(defaults)
    assert {k: v["default"] for k, v in options.items()} == defaults
    assert all(k.startswith(f"{role}_") for k in defaults)
    assert specs["preflight"]["options"] == options
