#!/usr/bin/python
"""Ansible module: associate, replace or remove an EC2 instance profile association."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ses_instance_profile_association
short_description: Associate an IAM instance profile with EC2 instances, or remove it
description:
  - Ensures that each given instance has the given instance profile associated
    (O(state=present)), or that the given profile is associated with none of them
    (O(state=absent)). amazon.aws has no module that detaches a profile.
  - The profile is always passed by ARN, never by role name.
  - Right after a profile is created, EC2 can answer "Invalid IAM Instance Profile
    name" while IAM propagates. Only that error is retried, with a growing delay,
    until O(retry_timeout) seconds have passed; then the module fails naming the
    profile and the likely cause.
  - Supports check mode and diff mode.
options:
  instance_ids:
    description:
      - Instances to act on. With O(state=absent) and an empty list, every
        association of the profile in the region is removed.
    type: list
    elements: str
    default: []
  profile_arn:
    description: ARN of the instance profile.
    type: str
    required: true
  state:
    description: Whether the profile must be associated or not.
    type: str
    choices: [present, absent]
    default: present
  replace_other:
    description:
      - With O(state=present), replace an association with another profile.
        When false, an instance with another profile makes the module fail.
    type: bool
    default: false
  retry_timeout:
    description: Seconds during which the propagation error is retried.
    type: int
    default: 120
  retry_delay:
    description: First delay in seconds between attempts; it doubles up to 15 s.
    type: float
    default: 2
extends_documentation_fragment:
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
author:
  - ses-mailer-ops
"""

EXAMPLES = r"""
- name: Ensure the mailer profile is associated
  ses_instance_profile_association:
    instance_ids: [i-0123456789abcdef0]
    profile_arn: arn:aws:iam::123456789012:instance-profile/ses-mailer
"""

RETURN = r"""
associations:
  description: Associations after the change (predicted in check mode).
  returned: always
  type: list
  elements: dict
  sample: [{"instance_id": "i-0123", "profile_arn": "arn:aws:iam::1:instance-profile/x"}]
attempts:
  description: Number of associate or replace calls made, retries included.
  returned: always
  type: int
"""

import time  # noqa: E402
from functools import partial  # noqa: E402
from typing import Any, Callable  # noqa: E402

try:
    from botocore.exceptions import BotoCoreError, ClientError
except ImportError:  # pragma: no cover - reported by AnsibleAWSModule
    pass

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule  # noqa: E402

PROPAGATION_MESSAGE = "Invalid IAM Instance Profile name"
MAX_DELAY = 15.0


def _current_associations(client: Any, instance_ids: list[str]) -> dict[str, dict[str, str]]:
    """Map instance id -> {"association_id", "profile_arn"} for live associations."""
    kwargs: dict[str, Any] = {
        "Filters": [{"Name": "state", "Values": ["associating", "associated"]}]
    }
    if instance_ids:
        kwargs["Filters"].append({"Name": "instance-id", "Values": instance_ids})
    found: dict[str, dict[str, str]] = {}
    paginator = client.get_paginator("describe_iam_instance_profile_associations")
    for page in paginator.paginate(**kwargs):
        for assoc in page.get("IamInstanceProfileAssociations", []):
            found[assoc["InstanceId"]] = {
                "association_id": assoc["AssociationId"],
                "profile_arn": assoc["IamInstanceProfile"]["Arn"],
            }
    return found


def _is_propagation_error(error: Exception) -> bool:
    if not isinstance(error, ClientError):
        return False
    message = str(error.response.get("Error", {}).get("Message", ""))
    return PROPAGATION_MESSAGE.lower() in message.lower()


class Associator:
    """Performs the calls, retrying only on the IAM propagation error."""

    def __init__(self, module: AnsibleAWSModule, client: Any) -> None:
        self.module = module
        self.client = client
        self.attempts = 0

    def call_with_retry(self, call: Callable[[], Any], profile_arn: str, instance_id: str) -> Any:
        deadline = time.monotonic() + self.module.params["retry_timeout"]
        delay = max(float(self.module.params["retry_delay"]), 0.0)
        while True:
            self.attempts += 1
            try:
                return call()
            except (BotoCoreError, ClientError) as error:
                if not _is_propagation_error(error):
                    self.module.fail_json_aws(
                        error, msg=f"Could not associate {profile_arn} with {instance_id}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.module.fail_json(
                        msg=(
                            f"Instance profile {profile_arn} is still unknown to EC2 after "
                            f"{self.module.params['retry_timeout']} s and {self.attempts} attempts "
                            f"({instance_id}): IAM has most likely not propagated the new profile "
                            "yet, or it was deleted meanwhile"
                        ),
                        attempts=self.attempts,
                    )
                time.sleep(min(delay, remaining))
                delay = min(max(delay * 2, 0.5), MAX_DELAY)


def main() -> None:
    module = AnsibleAWSModule(
        argument_spec=dict(
            instance_ids=dict(type="list", elements="str", default=[]),
            profile_arn=dict(type="str", required=True),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            replace_other=dict(type="bool", default=False),
            retry_timeout=dict(type="int", default=120),
            retry_delay=dict(type="float", default=2),
        ),
        supports_check_mode=True,
    )
    params = module.params
    profile_arn: str = params["profile_arn"]
    instance_ids: list[str] = sorted(set(params["instance_ids"]))
    if params["state"] == "present" and not instance_ids:
        module.exit_json(changed=False, associations=[], attempts=0)
    if not profile_arn.startswith("arn:") or ":instance-profile/" not in profile_arn:
        module.fail_json(msg=f"profile_arn must be an instance profile ARN, got {profile_arn!r}")

    client = module.client("ec2")
    try:
        current = _current_associations(client, instance_ids)
    except (BotoCoreError, ClientError) as error:
        module.fail_json_aws(error, msg="Could not list instance profile associations")

    associator = Associator(module, client)
    before: dict[str, str | None] = {}
    after: dict[str, str | None] = {}
    targets = instance_ids or sorted(current)
    for instance_id in targets:
        existing = current.get(instance_id)
        existing_arn = existing["profile_arn"] if existing else None
        before[instance_id] = existing_arn
        after[instance_id] = existing_arn
        if params["state"] == "absent":
            if existing is None or existing_arn != profile_arn:
                continue
            after[instance_id] = None
            if not module.check_mode:
                try:
                    client.disassociate_iam_instance_profile(
                        AssociationId=existing["association_id"]
                    )
                except (BotoCoreError, ClientError) as error:
                    module.fail_json_aws(
                        error, msg=f"Could not remove {profile_arn} from {instance_id}"
                    )
            continue
        if existing_arn == profile_arn:
            continue
        if existing is not None and not params["replace_other"]:
            module.fail_json(
                msg=(
                    f"Instance {instance_id} has instance profile {existing_arn}; "
                    "refusing to replace it without replace_other"
                )
            )
        after[instance_id] = profile_arn
        if module.check_mode:
            continue
        if existing is None:
            associator.call_with_retry(
                partial(
                    client.associate_iam_instance_profile,
                    IamInstanceProfile={"Arn": profile_arn},
                    InstanceId=instance_id,
                ),
                profile_arn,
                instance_id,
            )
        else:
            associator.call_with_retry(
                partial(
                    client.replace_iam_instance_profile_association,
                    IamInstanceProfile={"Arn": profile_arn},
                    AssociationId=existing["association_id"],
                ),
                profile_arn,
                instance_id,
            )

    changed = before != after
    result: dict[str, Any] = dict(
        changed=changed,
        attempts=associator.attempts,
        associations=[
            {"instance_id": iid, "profile_arn": arn} for iid, arn in sorted(after.items()) if arn
        ],
    )
    if module._diff:
        result["diff"] = {"before": before, "after": after}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
