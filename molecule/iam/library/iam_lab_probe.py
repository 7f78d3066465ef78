#!/usr/bin/python
"""Test-only module of the molecule iam scenario: read the emulator back, probe IAM enforcement."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: iam_lab_probe
short_description: Read the IAM state back from the lab's moto, or probe role credentials
description:
  - Test helper of the molecule iam scenario; it talks to a loopback endpoint only.
  - O(what=policy) returns the managed policy's versions and default document.
  - O(what=enforcement) takes STS credentials of the role (and of a throw-away
    clone whose policy has the same actions with the resources widened to C(*),
    because moto does not match SES identity ARNs), switches moto's IAM
    enforcement on, makes a set of calls with both, switches it off again and
    returns the HTTP status of every call.
options:
  endpoint:
    description: moto URL on loopback.
    type: str
    required: true
  region:
    description: Region.
    type: str
    required: true
  what:
    description: What to probe.
    type: str
    choices: [policy, enforcement]
    required: true
  policy_arn:
    description: ARN of the managed policy.
    type: str
    required: true
  role_name:
    description: Role whose credentials are probed (O(what=enforcement)).
    type: str
  sender:
    description: Verified sender used for the send probe.
    type: str
"""

import json  # noqa: E402
import urllib.request  # noqa: E402
from functools import partial  # noqa: E402
from ipaddress import ip_address  # noqa: E402
from typing import Any, Callable  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

try:
    import boto3
    from botocore.exceptions import ClientError

    HAS_BOTO3 = True
except ImportError:  # pragma: no cover
    HAS_BOTO3 = False


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ip_address(host).is_loopback
    except ValueError:
        return False


def _status(call: Callable[[], Any]) -> int:
    try:
        answer = call()
    except ClientError as error:
        return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    return int(answer["ResponseMetadata"]["HTTPStatusCode"])


def _set_enforcement(endpoint: str, value: str) -> None:
    request = urllib.request.Request(  # noqa: S310 - loopback checked by the caller
        f"{endpoint}/moto-api/reset-auth", data=value.encode(), method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
        answer.read()


def _widen(document: dict[str, Any]) -> dict[str, Any]:
    """Same actions, resources '*', no conditions: what moto can evaluate."""
    return {
        "Version": document["Version"],
        "Statement": [
            {"Effect": s["Effect"], "Action": s["Action"], "Resource": "*"}
            for s in document["Statement"]
        ],
    }


def _policy(session: Any, endpoint: str, arn: str) -> dict[str, Any]:
    iam = session.client("iam", endpoint_url=endpoint)
    try:
        policy = iam.get_policy(PolicyArn=arn)["Policy"]
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "NoSuchEntity":
            return {"exists": False, "versions": [], "document": None, "attached_roles": []}
        raise
    versions = iam.list_policy_versions(PolicyArn=arn)["Versions"]
    default = iam.get_policy_version(PolicyArn=arn, VersionId=policy["DefaultVersionId"])
    roles = iam.list_entities_for_policy(PolicyArn=arn)["PolicyRoles"]
    return {
        "exists": True,
        "versions": sorted(v["VersionId"] for v in versions),
        "document": default["PolicyVersion"]["Document"],
        "attached_roles": sorted(r["RoleName"] for r in roles),
    }


def _enforcement(session: Any, endpoint: str, params: dict[str, Any]) -> dict[str, Any]:
    iam = session.client("iam", endpoint_url=endpoint)
    sts = session.client("sts", endpoint_url=endpoint)
    role = iam.get_role(RoleName=params["role_name"])["Role"]
    document = _policy(session, endpoint, params["policy_arn"])["document"]
    clone = f"{params['role_name']}-probe-actionset"
    iam.create_role(RoleName=clone,
                    AssumeRolePolicyDocument=json.dumps(role["AssumeRolePolicyDocument"]))
    results: dict[str, Any] = {}
    try:
        iam.put_role_policy(RoleName=clone, PolicyName="actions",
                            PolicyDocument=json.dumps(_widen(document)))
        creds = {
            "role": sts.assume_role(RoleArn=role["Arn"], RoleSessionName="probe")["Credentials"],
            "actionset": sts.assume_role(RoleArn=iam.get_role(RoleName=clone)["Role"]["Arn"],
                                         RoleSessionName="probe")["Credentials"],
        }
        _set_enforcement(endpoint, "0")
        try:
            for name, cred in creds.items():
                kwargs = {
                    "endpoint_url": endpoint,
                    "aws_access_key_id": cred["AccessKeyId"],
                    "aws_secret_access_key": cred["SecretAccessKey"],
                    "aws_session_token": cred["SessionToken"],
                    "region_name": params["region"],
                }
                sesv2 = boto3.client("sesv2", **kwargs)
                ses = boto3.client("ses", **kwargs)
                role_iam = boto3.client("iam", **kwargs)
                results[name] = {
                    "caller": boto3.client("sts", **kwargs).get_caller_identity()["Arn"],
                    "SendEmail": _status(partial(
                        sesv2.send_email,
                        FromEmailAddress=params["sender"],
                        Destination={"ToAddresses": ["ops@example.com"]},
                        Content={"Simple": {"Subject": {"Data": "probe"},
                                            "Body": {"Text": {"Data": "probe"}}}})),
                    "DeleteEmailIdentity": _status(
                        partial(sesv2.delete_email_identity, EmailIdentity="example.com")),
                    "DeleteIdentity": _status(partial(ses.delete_identity,
                                                      Identity=params["sender"])),
                    "ListUsers": _status(role_iam.list_users),
                }
        finally:
            _set_enforcement(endpoint, "inf")
    finally:
        for policy_name in iam.list_role_policies(RoleName=clone)["PolicyNames"]:
            iam.delete_role_policy(RoleName=clone, PolicyName=policy_name)
        iam.delete_role(RoleName=clone)
    return results


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            endpoint=dict(type="str", required=True),
            region=dict(type="str", required=True),
            what=dict(type="str", choices=["policy", "enforcement"], required=True),
            policy_arn=dict(type="str", required=True),
            role_name=dict(type="str"),
            sender=dict(type="str"),
        ),
        required_if=[("what", "enforcement", ["role_name", "sender"])],
        supports_check_mode=True,
    )
    if not HAS_BOTO3:
        module.fail_json(msg="boto3 is required")
    endpoint = module.params["endpoint"]
    if not _loopback(endpoint):
        module.fail_json(msg=f"endpoint must be on loopback, got {endpoint}")
    session = boto3.session.Session(region_name=module.params["region"])
    try:
        if module.params["what"] == "policy":
            result = _policy(session, endpoint, module.params["policy_arn"])
        else:
            result = _enforcement(session, endpoint, module.params)
    except ClientError as error:
        module.fail_json(msg=f"probe failed: {error}")
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
