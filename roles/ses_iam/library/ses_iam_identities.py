#!/usr/bin/python
"""Ansible module: report (and optionally create) SES v2 sender identities."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ses_iam_identities
short_description: Report the verification state of SES v2 identities, optionally create them
description:
  - Reads each given email address and domain identity with the SES v2 API and
    reports whether it exists and is verified for sending in the region.
  - With O(create=true), missing identities are created (domains with Easy DKIM);
    the DKIM tokens to publish as CNAME records are returned.
  - With O(detect_sandbox=true), reads the account (SES v2 GetAccount) and
    returns whether production access is enabled. When the endpoint does not
    implement that call, RV(production_access) is V(null).
  - amazon.aws and community.aws have no SES v2 identity module; this one
    exists for that reason. Supports check mode.
options:
  addresses:
    description: Email address identities.
    type: list
    elements: str
    default: []
  domains:
    description: Domain identities.
    type: list
    elements: str
    default: []
  probe_domains:
    description:
      - Domain identities that are only read, never created (for example the
        domains of the sender addresses).
    type: list
    elements: str
    default: []
  create:
    description: Create the identities in O(addresses) and O(domains) that do not exist.
    type: bool
    default: false
  detect_sandbox:
    description: Read the account's production access flag.
    type: bool
    default: true
extends_documentation_fragment:
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
author:
  - ses-mailer-ops
"""

EXAMPLES = r"""
- name: Read the sender identities
  ses_iam_identities:
    addresses: [mailer@example.com]
    domains: [example.org]
"""

RETURN = r"""
identities:
  description: One entry per requested identity.
  returned: always
  type: list
  elements: dict
  sample: [{"name": "example.org", "type": "domain", "exists": true, "verified": false,
            "dkim_tokens": ["abc"]}]
production_access:
  description: true or false as SES reports it; null when not detected.
  returned: always
  type: bool
"""

from typing import Any  # noqa: E402

try:
    from botocore.exceptions import BotoCoreError, ClientError
except ImportError:  # pragma: no cover - reported by AnsibleAWSModule
    pass

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule  # noqa: E402

NOT_IMPLEMENTED_CODES = {"NotImplemented", "NotImplementedException", "404", "InvalidAction"}


def _read(client: Any, name: str) -> dict[str, Any] | None:
    try:
        answer: dict[str, Any] = client.get_email_identity(EmailIdentity=name)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "NotFoundException":
            return None
        raise
    return answer


def _describe(name: str, kind: str, answer: dict[str, Any] | None) -> dict[str, Any]:
    if answer is None:
        return {"name": name, "type": kind, "exists": False, "verified": False,
                "status": "ABSENT", "dkim_tokens": []}
    status = answer.get("VerificationStatus") or (
        "SUCCESS" if answer.get("VerifiedForSendingStatus") else "PENDING"
    )
    return {
        "name": name,
        "type": kind,
        "exists": True,
        "verified": bool(answer.get("VerifiedForSendingStatus")) or status == "SUCCESS",
        "status": status,
        "dkim_tokens": sorted(answer.get("DkimAttributes", {}).get("Tokens", []) or []),
    }


def main() -> None:
    module = AnsibleAWSModule(
        argument_spec=dict(
            addresses=dict(type="list", elements="str", default=[]),
            domains=dict(type="list", elements="str", default=[]),
            probe_domains=dict(type="list", elements="str", default=[]),
            create=dict(type="bool", default=False),
            detect_sandbox=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    client = module.client("sesv2")
    wanted = [(a.lower(), "address") for a in module.params["addresses"]]
    wanted += [(d.lower(), "domain") for d in module.params["domains"]]
    creatable = {name for name, _kind in wanted}
    wanted += [(d.lower(), "domain") for d in module.params["probe_domains"]]
    changed = False
    identities = []
    for name, kind in sorted(set(wanted)):
        try:
            answer = _read(client, name)
            if answer is None and module.params["create"] and name in creatable:
                changed = True
                if not module.check_mode:
                    client.create_email_identity(EmailIdentity=name)
                    answer = _read(client, name)
        except (BotoCoreError, ClientError) as error:
            module.fail_json_aws(error, msg=f"Could not read or create SES identity {name}")
        identities.append(_describe(name, kind, answer))

    production_access: bool | None = None
    if module.params["detect_sandbox"]:
        try:
            account = client.get_account()
            production_access = bool(account.get("ProductionAccessEnabled"))
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = str(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code not in NOT_IMPLEMENTED_CODES and status not in NOT_IMPLEMENTED_CODES:
                module.fail_json_aws(error, msg="Could not read the SES account")
        except BotoCoreError as error:
            module.fail_json_aws(error, msg="Could not read the SES account")

    module.exit_json(changed=changed, identities=identities, production_access=production_access)


if __name__ == "__main__":
    main()
