"""Render the SES send policy and the EC2 trust policy of the ses_iam role.

The documents are built here, in typed Python, so that their exact content can
be unit-tested and linted with parliament for any combination of inputs.
Lists inside the documents are sorted, so the same inputs always give the same
text and IAM never sees a spurious change.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

SEND_ACTIONS = ["ses:SendEmail", "ses:SendRawEmail"]
QUOTA_ACTIONS = ["ses:GetAccount", "ses:GetSendQuota"]
EC2_PRINCIPAL = "ec2.amazonaws.com"


def _domain_of(address: str) -> str:
    return address.rsplit("@", 1)[1].lower()


def _unique_sorted(values: Iterable[str]) -> list[str]:
    return sorted(set(values))


def _one_or_list(values: list[str]) -> Any:
    return values[0] if len(values) == 1 else values


def ses_iam_send_policy(
    sender_addresses: list[str] | None,
    sender_domains: list[str] | None,
    *,
    partition: str,
    account_id: str,
    region: str,
    configuration_set: str = "",
    recipient_patterns: list[str] | None = None,
    quota_pacing: bool = False,
    known_identities: list[str] | None = None,
) -> dict[str, Any]:
    """Return the least-privilege SES send policy as a dict.

    sender_addresses: exact From addresses allowed.
    sender_domains: domains whose every address may send ("*@domain").
    known_identities: identities that exist in SES in this region; the domain
        identity of a sender address is added to the resources when the domain
        is configured as a sender domain or exists as an identity.
    """
    addresses = [a.strip().lower() for a in sender_addresses or []]
    domains = [d.strip().lower() for d in sender_domains or []]
    if not addresses and not domains:
        raise ValueError("at least one sender address or domain is required")
    if not account_id.isdigit() or len(account_id) != 12:
        raise ValueError(f"account id must be 12 digits, got {account_id!r}")
    known = {i.strip().lower() for i in known_identities or []}

    arn_prefix = f"arn:{partition}:ses:{region}:{account_id}"
    identities = set(addresses) | set(domains)
    for address in addresses:
        domain = _domain_of(address)
        if domain in domains or domain in known:
            identities.add(domain)
    resources = [f"{arn_prefix}:identity/{name}" for name in sorted(identities)]
    if configuration_set:
        resources.append(f"{arn_prefix}:configuration-set/{configuration_set}")

    from_patterns = _unique_sorted(addresses + [f"*@{d}" for d in domains])
    condition: dict[str, dict[str, Any]] = {
        "StringLike": {"ses:FromAddress": _one_or_list(from_patterns)},
    }
    recipients = _unique_sorted(p.strip().lower() for p in recipient_patterns or [])
    if recipients:
        condition["ForAllValues:StringLike"] = {"ses:Recipients": _one_or_list(recipients)}

    statements: list[dict[str, Any]] = [
        {
            "Sid": "SendFromAllowedSenders",
            "Effect": "Allow",
            "Action": list(SEND_ACTIONS),
            "Resource": _one_or_list(resources),
            "Condition": condition,
        }
    ]
    if quota_pacing:
        statements.append(
            {
                "Sid": "ReadSendQuota",
                "Effect": "Allow",
                "Action": list(QUOTA_ACTIONS),
                "Resource": "*",
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}


def ses_iam_trust_policy(_unused: Any = None) -> dict[str, Any]:
    """Return the trust policy that lets EC2 assume the role."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Ec2AssumeRole",
                "Effect": "Allow",
                "Principal": {"Service": EC2_PRINCIPAL},
                "Action": "sts:AssumeRole",
            }
        ],
    }


def ses_iam_unverified_senders(
    sender_addresses: list[str] | None,
    sender_domains: list[str] | None,
    verified_identities: list[str] | None,
) -> list[str]:
    """Return the allowed senders that cannot send because no identity covers them.

    An address is covered by its own verified identity or by its verified domain.
    """
    verified = {v.lower() for v in verified_identities or []}
    missing = [
        a
        for a in (x.lower() for x in sender_addresses or [])
        if a not in verified and _domain_of(a) not in verified
    ]
    missing += [d for d in (x.lower() for x in sender_domains or []) if d not in verified]
    return missing


def ses_iam_partition(arn: str) -> str:
    """Return the partition field of an ARN ("aws", "aws-cn", ...)."""
    parts = arn.split(":")
    if len(parts) < 6 or parts[0] != "arn":
        raise ValueError(f"not an ARN: {arn!r}")
    return parts[1]


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        return {
            "ses_iam_send_policy": ses_iam_send_policy,
            "ses_iam_trust_policy": ses_iam_trust_policy,
            "ses_iam_partition": ses_iam_partition,
            "ses_iam_unverified_senders": ses_iam_unverified_senders,
        }
