"""Filters of the ses_instance role."""

from __future__ import annotations

from typing import Any, Callable


def ses_instance_profile_summary(instance: dict[str, Any]) -> dict[str, Any]:
    """Reduce an ec2_instance_info entry to its id and instance profile ARN (or None)."""
    profile = instance.get("iam_instance_profile") or {}
    return {"instance_id": instance["instance_id"], "profile": profile.get("arn")}


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        return {"ses_instance_profile_summary": ses_instance_profile_summary}
