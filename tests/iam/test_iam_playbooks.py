"""playbooks/aws.yml and teardown-aws.yml against moto behind the recording proxy.

Covers C01-C04 of ../shared/cases/README.md, check mode on an empty account,
idempotence without mutating calls, preflight failures and the teardown order.

Each scenario gets a moto process and a proxy of its own, so the scenarios of
the selected tests run side by side (SES_TEST_IAM_WORKERS at a time, default 3)
in a module fixture; each test then reports its own scenario's outcome, with
the assertion that failed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from lab.awsproxy import Fault
from tests.iam.iamlab import REGION, SENDER, AwsLab, aws_lab, policy_plugin

ses_iam_send_policy = policy_plugin().ses_iam_send_policy

PROPAGATION = (
    "Value ({arn}) for parameter iamInstanceProfile.arn is invalid. "
    "Invalid IAM Instance Profile name"
)


SCENARIOS: dict[str, Callable[[AwsLab], None]] = {}
Outcomes = dict[str, "BaseException | None"]


def scenario(function: Callable[[AwsLab], None]) -> Callable[[AwsLab], None]:
    """Register a scenario; the test named test_<scenario> reports its outcome."""
    SCENARIOS[function.__name__] = function
    return function


@pytest.fixture(scope="module")
def outcomes(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Outcomes:
    wanted = sorted(
        item.name.removeprefix("test_")
        for item in request.session.items
        if isinstance(item, pytest.Function)
        and item.module is request.module
        and item.name.removeprefix("test_") in SCENARIOS
    )

    # Made here, one by one: mktemp is not safe from several threads, and
    # scenario names that share their first characters collided there.
    work_dirs = {
        name: tmp_path_factory.mktemp(f"scenario{index:02d}") for index, name in enumerate(wanted)
    }

    def run(name: str) -> None:
        prefix = "t-" + re.sub(r"[^a-z0-9]+", "-", name.lower())[:30].strip("-")
        with aws_lab(prefix, work_dirs[name]) as lab:
            SCENARIOS[name](lab)

    workers = max(1, int(os.environ.get("SES_TEST_IAM_WORKERS", "3")))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(run, name) for name in wanted}
    return {name: future.exception() for name, future in futures.items()}


def _report(outcomes: Outcomes, name: str) -> None:
    error = outcomes[name]
    if error is not None:
        raise error


def _assert_no_mutation(run_calls: list[str]) -> None:
    assert run_calls == [], f"an unchanged run made mutating calls: {run_calls}"


@scenario
def check_real_check_real_then_teardown_in_aws_order(lab: AwsLab) -> None:
    """The amazon.aws order: check, info shows nothing, real, check again, real again."""
    lab.verify_sender()
    instances = lab.make_instances(2)
    mailers = {"m1": instances[0]}  # one by the inventory group, the other by tag filter
    extra = {"ses_instance_metadata_hop_limit": 2}

    check = lab.playbook("aws.yml", extra, check=True, mailers=mailers)
    assert check.rc == 0, check.explain()
    assert check.changed == 5, check.explain()
    assert check.mutating() == []
    assert lab.iam_names() == {"roles": [], "profiles": [], "policies": []}
    assert lab.associations(instances) == {}
    assert lab.metadata_options(instances[0])["HttpTokens"] == "optional"
    assert f"{instances[1]}: {lab.profile_arn()}" in check.stdout

    first = lab.playbook("aws.yml", extra, mailers=mailers)
    assert first.rc == 0, first.explain()
    assert first.changed == 5, first.explain()
    assert "is in the sandbox" not in first.stdout
    for again in (lab.playbook("aws.yml", extra, check=True, mailers=mailers),
                  lab.playbook("aws.yml", extra, mailers=mailers)):
        assert again.rc == 0, again.explain()
        assert again.changed == 0, again.explain()
        _assert_no_mutation(again.mutating())

    assert lab.associations(instances) == {i: lab.profile_arn() for i in instances}
    for instance in instances:
        assert lab.metadata_options(instance) == {
            "HttpTokens": "required",
            "HttpPutResponseHopLimit": 2,
            "HttpEndpoint": "enabled",
            "HttpProtocolIpv6": "disabled",
            "InstanceMetadataTags": "disabled",
        }
    iam = lab.client("iam")
    versions = iam.list_policy_versions(PolicyArn=lab.policy_arn())["Versions"]
    assert [v["VersionId"] for v in versions] == ["v1"]
    document = iam.get_policy_version(PolicyArn=lab.policy_arn(), VersionId="v1")
    assert document["PolicyVersion"]["Document"] == ses_iam_send_policy(
        [SENDER], [], partition="aws", account_id=lab.account(), region=REGION
    )
    assert lab.attached(lab.role) == [lab.policy_arn()]
    role = iam.get_role(RoleName=lab.role)["Role"]
    assert role["AssumeRolePolicyDocument"]["Statement"] == [{
        "Sid": "Ec2AssumeRole", "Effect": "Allow",
        "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole",
    }]
    profile = iam.get_instance_profile(InstanceProfileName=lab.role)["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == [lab.role]

    down = lab.playbook("teardown-aws.yml")
    assert down.rc == 0, down.explain()
    order = [a for a in down.mutating() if a != "DeletePolicyVersion"]
    assert order == [
        "DisassociateIamInstanceProfile",
        "DisassociateIamInstanceProfile",
        "RemoveRoleFromInstanceProfile",
        "DeleteInstanceProfile",
        "DetachRolePolicy",
        "DeletePolicy",
        "DeleteRole",
    ], down.explain()
    assert lab.iam_names() == {"roles": [], "profiles": [], "policies": []}
    assert lab.associations(instances) == {}
    again = lab.playbook("teardown-aws.yml")
    assert again.changed == 0, again.explain()
    _assert_no_mutation(again.mutating())


@scenario
def c04_same_policy_with_keys_in_another_order_is_unchanged(lab: AwsLab) -> None:
    lab.verify_sender()
    extra = {"ses_iam_sender_domains": ["example.org"], "ses_iam_recipient_patterns":
             ["*@example.com", "ops@example.net"], "ses_iam_quota_pacing": True,
             "ses_iam_require_verified": False}
    expected = ses_iam_send_policy(
        [SENDER], ["example.org"], partition="aws", account_id=lab.account(), region=REGION,
        recipient_patterns=["*@example.com", "ops@example.net"], quota_pacing=True,
    )

    def reorder(value: object) -> object:
        if isinstance(value, dict):
            return {k: reorder(value[k]) for k in reversed(list(value))}
        if isinstance(value, list):
            return [reorder(v) for v in reversed(value)]
        return value

    lab.client("iam").create_policy(
        PolicyName=lab.policy, PolicyDocument=json.dumps(reorder(expected)),
        Description="Send mail through SES from the allowed senders only (ses-mailer-ops)",
        Tags=[{"Key": "managed-by", "Value": "ses-mailer-ops"}],
    )
    run = lab.playbook("aws.yml", extra)
    assert run.rc == 0, run.explain()
    assert "CreatePolicyVersion" not in run.actions()
    assert "CreatePolicy" not in run.actions()
    assert "Ensure the SES send policy exists with the rendered document] ***\nok:" in run.stdout
    versions = lab.client("iam").list_policy_versions(PolicyArn=lab.policy_arn())["Versions"]
    assert len(versions) == 1


@scenario
def c01_propagation_error_is_retried_then_succeeds(lab: AwsLab) -> None:
    lab.verify_sender()
    [instance] = lab.make_instances()
    message = PROPAGATION.format(arn=lab.profile_arn())
    lab.proxy.set_faults([Fault("AssociateIamInstanceProfile", "InvalidParameterValue", message,
                                times=2, service="ec2")])
    run = lab.playbook("aws.yml")
    assert run.rc == 0, run.explain()
    attaches = [c for c in run.calls if c.action == "AssociateIamInstanceProfile"]
    assert [c.injected for c in attaches] == [True, True, False]
    # Always the profile ARN, never the role name.
    assert {c.params["IamInstanceProfile.Arn"] for c in attaches} == {lab.profile_arn()}
    assert lab.associations([instance]) == {instance: lab.profile_arn()}


@scenario
def c01_propagation_error_forever_fails_within_the_bound(lab: AwsLab) -> None:
    lab.verify_sender()
    lab.make_instances()
    message = PROPAGATION.format(arn=lab.profile_arn())
    lab.proxy.set_faults([Fault("AssociateIamInstanceProfile", "InvalidParameterValue", message,
                                times=None, service="ec2")])
    run = lab.playbook("aws.yml", {"ses_instance_attach_timeout": 3})
    assert run.rc == 2, run.explain()
    assert (f"Instance profile {lab.profile_arn()} is still unknown to EC2 after 3 s") in run.stdout
    assert "IAM has most likely not propagated the new profile yet" in run.stdout
    attaches = [c for c in run.calls if c.action == "AssociateIamInstanceProfile"]
    assert 3 <= len(attaches) <= 8
    assert run.seconds < 60


@scenario
def c01_other_errors_are_not_retried(lab: AwsLab) -> None:
    lab.verify_sender()
    lab.make_instances()
    lab.proxy.set_faults([Fault("AssociateIamInstanceProfile", "UnauthorizedOperation",
                                "You are not authorized to perform this operation.",
                                times=None, service="ec2")])
    run = lab.playbook("aws.yml")
    assert run.rc == 2, run.explain()
    assert run.actions().count("AssociateIamInstanceProfile") == 1
    assert "UnauthorizedOperation" in run.stdout


@scenario
def c02_extend_keeps_the_legacy_profile_and_adds_our_policy(lab: AwsLab) -> None:
    lab.verify_sender()
    [instance] = lab.make_instances()
    legacy_role, legacy_arn, legacy_own = lab.make_legacy(instance)
    trust_before = lab.client("iam").get_role(RoleName=legacy_role)["Role"]
    first = lab.playbook("aws.yml")
    assert first.rc == 0, first.explain()
    assert lab.associations([instance]) == {instance: legacy_arn}
    assert lab.attached(legacy_role) == sorted([legacy_own, lab.policy_arn()])
    trust_after = lab.client("iam").get_role(RoleName=legacy_role)["Role"]
    assert trust_after["AssumeRolePolicyDocument"] == trust_before["AssumeRolePolicyDocument"]
    again = lab.playbook("aws.yml")
    assert again.changed == 0, again.explain()
    _assert_no_mutation(again.mutating())
    # Never "ok" while the state differs: someone detaches our policy.
    lab.client("iam").detach_role_policy(RoleName=legacy_role, PolicyArn=lab.policy_arn())
    drift = lab.playbook("aws.yml")
    assert drift.changed == 1, drift.explain()
    assert drift.mutating() == ["AttachRolePolicy"]
    # Teardown: the legacy role keeps everything but our policy.
    down = lab.playbook("teardown-aws.yml")
    assert down.rc == 0, down.explain()
    assert lab.attached(legacy_role) == [legacy_own]
    assert lab.associations([instance]) == {instance: legacy_arn}
    assert lab.iam_names() == {
        "roles": [legacy_role], "profiles": [f"{lab.prefix}-legacy-profile"],
        "policies": [f"{lab.prefix}-legacy-own"],
    }


@scenario
def c02_replace_swaps_the_association(lab: AwsLab) -> None:
    lab.verify_sender()
    [instance] = lab.make_instances()
    legacy_role, legacy_arn, legacy_own = lab.make_legacy(instance)
    extra = {"ses_instance_existing_profile_mode": "replace"}
    first = lab.playbook("aws.yml", extra)
    assert first.rc == 0, first.explain()
    assert "ReplaceIamInstanceProfileAssociation" in first.mutating()
    assert lab.associations([instance]) == {instance: lab.profile_arn()}
    assert lab.attached(legacy_role) == [legacy_own]
    again = lab.playbook("aws.yml", extra)
    assert again.changed == 0, again.explain()
    _assert_no_mutation(again.mutating())
    # Someone puts the legacy profile back: the next run must notice and fix it.
    ec2 = lab.client("ec2")
    [assoc] = ec2.describe_iam_instance_profile_associations(
        Filters=[{"Name": "instance-id", "Values": [instance]}]
    )["IamInstanceProfileAssociations"]
    ec2.replace_iam_instance_profile_association(
        IamInstanceProfile={"Arn": legacy_arn}, AssociationId=assoc["AssociationId"]
    )
    fixed = lab.playbook("aws.yml", extra)
    assert fixed.changed == 1, fixed.explain()
    assert lab.associations([instance]) == {instance: lab.profile_arn()}


@scenario
def c03_existing_profile_with_the_role_name_is_reused(lab: AwsLab) -> None:
    lab.verify_sender()
    [instance] = lab.make_instances()
    iam = lab.client("iam")
    created = iam.create_instance_profile(InstanceProfileName=lab.role)["InstanceProfile"]
    first = lab.playbook("aws.yml")
    assert first.rc == 0, first.explain()
    assert "CreateInstanceProfile" not in first.actions()
    profile = iam.get_instance_profile(InstanceProfileName=lab.role)["InstanceProfile"]
    assert profile["InstanceProfileId"] == created["InstanceProfileId"]
    assert [r["RoleName"] for r in profile["Roles"]] == [lab.role]
    assert lab.associations([instance]) == {instance: created["Arn"]}
    second = lab.playbook("aws.yml")
    assert second.changed == 0, second.explain()
    _assert_no_mutation(second.mutating())


@scenario
def bad_values_fail_before_any_aws_call(lab: AwsLab) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"ses_iam_sender_addresses": ["*@example.com"]}, "ses_iam_sender_addresses: not plain"),
        ({"ses_iam_path": "mail"}, "ses_iam_path: must start and end with '/'"),
        ({"ses_instance_metadata_hop_limit": 0},
         "ses_instance_metadata_hop_limit: must be between"),
        ({"ses_aws_instance_ids": ["web-1"]}, "ses_instance_ids: not EC2 instance ids"),
        ({"ses_iam_sender_addresses": [], "ses_iam_sender_domains": []},
         "ses_iam_sender_addresses: set at least one sender"),
    ]
    for extra, expected in cases:
        run = lab.playbook("aws.yml", extra)
        assert run.rc == 2, run.explain()
        assert expected in run.stdout, run.explain()
        assert run.calls == [], f"{extra} reached AWS: {run.actions()}"


@scenario
def unverified_sender_fails_before_iam_changes(lab: AwsLab) -> None:
    run = lab.playbook("aws.yml", {"ses_iam_sender_addresses": [f"nobody@{lab.prefix}.example"]})
    assert run.rc == 2, run.explain()
    assert (f"not verified in {REGION}: nobody@{lab.prefix}.example") in run.stdout
    assert run.mutating() == []


@scenario
def sandbox_is_reported_once_and_plainly(lab: AwsLab) -> None:
    lab.verify_sender()
    run = lab.playbook("aws.yml", {"ses_iam_sandbox": "sandbox"}, check=True, tags="iam")
    assert run.rc == 0, run.explain()
    line = ("is in the sandbox: every recipient must be a verified identity, "
            "at most 200 mails per 24 hours and 1 mail per second")
    assert " ".join(run.stdout.split()).count(line) == 1, run.explain()
    auto = lab.playbook("aws.yml", {"ses_iam_sandbox": "auto"}, check=True, tags="iam")
    assert "SES sandbox state in us-east-1 could not be read" in " ".join(auto.stdout.split())


@scenario
def identities_are_created_when_asked(lab: AwsLab) -> None:
    domain = f"{lab.prefix}.example"
    extra = {"ses_iam_sender_addresses": [], "ses_iam_sender_domains": [domain],
             "ses_iam_identities_create": True}
    sesv2 = lab.client("sesv2")

    def exists() -> bool:
        names = [i["IdentityName"] for i in sesv2.list_email_identities()["EmailIdentities"]]
        return domain in names

    check = lab.playbook("aws.yml", extra, check=True, tags="iam")
    assert check.rc == 0, check.explain()
    assert check.mutating() == []
    assert not exists()
    first = lab.playbook("aws.yml", extra, tags="iam")
    assert first.rc == 0, first.explain()
    assert "POST /v2/email/identities" in first.mutating()
    assert exists()
    again = lab.playbook("aws.yml", extra, tags="iam")
    assert again.changed == 0, again.explain()
    _assert_no_mutation(again.mutating())


# --- one test per scenario ---------------------------------------------------


def test_check_real_check_real_then_teardown_in_aws_order(outcomes: Outcomes) -> None:
    _report(outcomes, "check_real_check_real_then_teardown_in_aws_order")


def test_c04_same_policy_with_keys_in_another_order_is_unchanged(outcomes: Outcomes) -> None:
    _report(outcomes, "c04_same_policy_with_keys_in_another_order_is_unchanged")


def test_c01_propagation_error_is_retried_then_succeeds(outcomes: Outcomes) -> None:
    _report(outcomes, "c01_propagation_error_is_retried_then_succeeds")


def test_c01_propagation_error_forever_fails_within_the_bound(outcomes: Outcomes) -> None:
    _report(outcomes, "c01_propagation_error_forever_fails_within_the_bound")


def test_c01_other_errors_are_not_retried(outcomes: Outcomes) -> None:
    _report(outcomes, "c01_other_errors_are_not_retried")


def test_c02_extend_keeps_the_legacy_profile_and_adds_our_policy(outcomes: Outcomes) -> None:
    _report(outcomes, "c02_extend_keeps_the_legacy_profile_and_adds_our_policy")


def test_c02_replace_swaps_the_association(outcomes: Outcomes) -> None:
    _report(outcomes, "c02_replace_swaps_the_association")


def test_c03_existing_profile_with_the_role_name_is_reused(outcomes: Outcomes) -> None:
    _report(outcomes, "c03_existing_profile_with_the_role_name_is_reused")


def test_bad_values_fail_before_any_aws_call(outcomes: Outcomes) -> None:
    _report(outcomes, "bad_values_fail_before_any_aws_call")


def test_unverified_sender_fails_before_iam_changes(outcomes: Outcomes) -> None:
    _report(outcomes, "unverified_sender_fails_before_iam_changes")


def test_sandbox_is_reported_once_and_plainly(outcomes: Outcomes) -> None:
    _report(outcomes, "sandbox_is_reported_once_and_plainly")


def test_identities_are_created_when_asked(outcomes: Outcomes) -> None:
    _report(outcomes, "identities_are_created_when_asked")
