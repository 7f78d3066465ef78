"""The fake IMDSv2 (lab/imds.py) against an in-process moto, over real HTTP.

The last tests run boto3 in a child process whose only credential source is
the fake metadata service, as the mail program on a lab host does.
"""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import boto3
import pytest
from moto.server import ThreadedMotoServer

from lab import imds
from tests.safety import DUMMY_KEY, loopback_env

REGION = "us-east-1"
REPO = Path(__file__).resolve().parent.parent
TRUST_EC2 = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "ec2.amazonaws.com"},
                "Action": "sts:AssumeRole",
            }
        ],
    }
)
_names = itertools.count(1)


@dataclass
class Response:
    status: int
    body: str
    headers: dict[str, str]

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


def request(
    base_url: str, method: str, path: str, headers: dict[str, str] | None = None
) -> Response:
    """One plain HTTP request, no proxies, no retries."""
    host_port = base_url.split("//", 1)[1].rstrip("/")
    host, port = host_port.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path, headers=headers or {})
        reply = connection.getresponse()
        body = reply.read().decode()
        return Response(reply.status, body, {k.lower(): v for k, v in reply.getheaders()})
    finally:
        connection.close()


def epoch(stamp: str) -> float:
    """Seconds since the epoch of an ISO-8601 UTC stamp as IMDS writes it."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


def token(base_url: str, ttl: int = 21600) -> str:
    reply = request(base_url, "PUT", "/latest/api/token", {imds.TTL_HEADER: str(ttl)})
    assert reply.status == 200, reply
    return reply.body


def get(base_url: str, path: str, ttl: int = 60) -> Response:
    """GET with a fresh token, as a well-behaved IMDSv2 client does."""
    return request(base_url, "GET", path, {imds.TOKEN_HEADER: token(base_url, ttl)})


class Aws:
    """boto3 clients on the in-process moto, with dummy keys."""

    def __init__(self, url: str) -> None:
        self.url = url
        session = boto3.session.Session(
            aws_access_key_id=DUMMY_KEY, aws_secret_access_key=DUMMY_KEY, region_name=REGION
        )
        self.ec2 = session.client("ec2", endpoint_url=url)
        self.iam = session.client("iam", endpoint_url=url)
        self.sts = session.client("sts", endpoint_url=url)
        self._image = str(self.ec2.describe_images()["Images"][0]["ImageId"])

    def run_instance(self, http_tokens: str = "required") -> str:
        reply = self.ec2.run_instances(
            ImageId=self._image,
            MinCount=1,
            MaxCount=1,
            MetadataOptions={"HttpTokens": http_tokens, "HttpEndpoint": "enabled"},  # type: ignore[typeddict-item]
        )
        return str(reply["Instances"][0]["InstanceId"])

    def role_profile(self, stem: str) -> tuple[str, str]:
        """A role and a profile (named apart, as on AWS they may be) holding it."""
        number = next(_names)
        role = f"{stem}-role-{number}"
        profile = f"{stem}-profile-{number}"
        self.iam.create_role(RoleName=role, AssumeRolePolicyDocument=TRUST_EC2)
        self.iam.create_instance_profile(InstanceProfileName=profile)
        self.iam.add_role_to_instance_profile(InstanceProfileName=profile, RoleName=role)
        return role, profile

    def associate(self, instance_id: str, profile: str) -> str:
        reply = self.ec2.associate_iam_instance_profile(
            InstanceId=instance_id, IamInstanceProfile={"Name": profile}
        )
        return str(reply["IamInstanceProfileAssociation"]["AssociationId"])

    def caller_arn(self, credentials: dict[str, Any]) -> str:
        sts = boto3.session.Session(
            aws_access_key_id=credentials["AccessKeyId"],
            aws_secret_access_key=credentials["SecretAccessKey"],
            aws_session_token=credentials["Token"],
            region_name=REGION,
        ).client("sts", endpoint_url=self.url)
        return str(sts.get_caller_identity()["Arn"])


@pytest.fixture(scope="module")
def aws() -> Iterator[Aws]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield Aws(f"http://{host}:{port}")
    finally:
        server.stop()


StartImds = Callable[..., str]


@pytest.fixture
def start_imds(aws: Aws) -> Iterator[StartImds]:
    """Start a fake IMDS for an instance in-process; returns its base URL."""
    servers: list[imds.ImdsServer] = []

    def start(instance_id: str, credential_lifetime: int = imds.DEFAULT_CREDENTIAL_LIFETIME) -> str:
        server = imds.make_server(
            instance_id, aws.url, REGION, credential_lifetime=credential_lifetime
        ).start()
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.stop()


# --- token rules -------------------------------------------------------------


@pytest.mark.parametrize(
    ("ttl_headers", "scenario"),
    [
        ({}, "TTL header missing"),
        ({imds.TTL_HEADER: "0"}, "TTL below 1"),
        ({imds.TTL_HEADER: "21601"}, "TTL above 21600"),
        ({imds.TTL_HEADER: "-5"}, "negative TTL"),
        ({imds.TTL_HEADER: "ten"}, "TTL not a number"),
        ({imds.TTL_HEADER: ""}, "TTL empty"),
    ],
)
def test_token_put_without_a_valid_ttl_is_400(
    aws: Aws, start_imds: StartImds, ttl_headers: dict[str, str], scenario: str
) -> None:
    url = start_imds(aws.run_instance())
    reply = request(url, "PUT", "/latest/api/token", ttl_headers)
    assert reply.status == 400, scenario


@pytest.mark.parametrize("ttl", [1, 21600])
def test_token_put_returns_token_and_echoes_ttl(aws: Aws, start_imds: StartImds, ttl: int) -> None:
    url = start_imds(aws.run_instance())
    reply = request(url, "PUT", "/latest/api/token", {imds.TTL_HEADER: str(ttl)})
    assert reply.status == 200
    assert len(reply.body) >= 40
    assert reply.headers[imds.TTL_HEADER.lower()] == str(ttl)


def test_token_put_with_x_forwarded_for_is_403(aws: Aws, start_imds: StartImds) -> None:
    url = start_imds(aws.run_instance())
    reply = request(
        url,
        "PUT",
        "/latest/api/token",
        {imds.TTL_HEADER: "60", "X-Forwarded-For": "127.0.0.9"},
    )
    assert reply.status == 403
    assert reply.body != "" and imds.TTL_HEADER.lower() not in reply.headers


def test_get_without_token_is_401_when_tokens_required(aws: Aws, start_imds: StartImds) -> None:
    url = start_imds(aws.run_instance(http_tokens="required"))
    assert request(url, "GET", "/latest/meta-data/instance-id").status == 401


def test_get_without_token_is_401_when_http_tokens_absent(aws: Aws, start_imds: StartImds) -> None:
    instance_id = aws.run_instance(http_tokens="optional")
    # moto drops the fields a partial modify does not send: HttpTokens vanishes.
    aws.ec2.modify_instance_metadata_options(InstanceId=instance_id, HttpEndpoint="enabled")
    reservations = aws.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    assert "HttpTokens" not in reservations[0]["Instances"][0]["MetadataOptions"]
    url = start_imds(instance_id)
    assert request(url, "GET", "/latest/meta-data/instance-id").status == 401


def test_get_without_token_is_served_when_tokens_optional(aws: Aws, start_imds: StartImds) -> None:
    instance_id = aws.run_instance(http_tokens="optional")
    url = start_imds(instance_id)
    reply = request(url, "GET", "/latest/meta-data/instance-id")
    assert (reply.status, reply.body) == (200, instance_id)


def test_tokens_required_is_read_from_moto_on_each_request(aws: Aws, start_imds: StartImds) -> None:
    instance_id = aws.run_instance(http_tokens="optional")
    url = start_imds(instance_id)
    assert request(url, "GET", "/latest/meta-data/instance-id").status == 200
    aws.ec2.modify_instance_metadata_options(
        InstanceId=instance_id, HttpTokens="required", HttpEndpoint="enabled"
    )
    assert request(url, "GET", "/latest/meta-data/instance-id").status == 401


def test_get_with_unknown_token_is_401(aws: Aws, start_imds: StartImds) -> None:
    url = start_imds(aws.run_instance(http_tokens="optional"))
    reply = request(url, "GET", "/latest/meta-data/instance-id", {imds.TOKEN_HEADER: "forged"})
    assert reply.status == 401


def test_get_with_expired_token_is_401(aws: Aws, start_imds: StartImds) -> None:
    instance_id = aws.run_instance()
    url = start_imds(instance_id)
    short = token(url, ttl=1)
    fresh = request(url, "GET", "/latest/meta-data/instance-id", {imds.TOKEN_HEADER: short})
    assert (fresh.status, fresh.body) == (200, instance_id)
    assert fresh.headers[imds.TTL_HEADER.lower()] == "1"
    time.sleep(1.2)
    stale = request(url, "GET", "/latest/meta-data/instance-id", {imds.TOKEN_HEADER: short})
    assert stale.status == 401


def test_http_endpoint_disabled_refuses_everything_with_403(
    aws: Aws, start_imds: StartImds
) -> None:
    instance_id = aws.run_instance()
    url = start_imds(instance_id)
    good = token(url)
    aws.ec2.modify_instance_metadata_options(
        InstanceId=instance_id, HttpTokens="required", HttpEndpoint="disabled"
    )
    put = request(url, "PUT", "/latest/api/token", {imds.TTL_HEADER: "60"})
    got = request(url, "GET", "/latest/meta-data/instance-id", {imds.TOKEN_HEADER: good})
    assert (put.status, got.status) == (403, 403)


def test_other_methods_are_405(aws: Aws, start_imds: StartImds) -> None:
    url = start_imds(aws.run_instance())
    assert request(url, "POST", "/latest/api/token").status == 405
    assert request(url, "PUT", "/latest/meta-data/instance-id").status == 405


def test_moto_is_reached_directly_even_with_a_proxy_in_the_environment(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as trap:
        trap.settimeout(0.5)
        proxy = f"http://127.0.0.1:{trap.getsockname()[1]}"
        for variable in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            monkeypatch.setenv(variable, proxy)
        for variable in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(variable, raising=False)
        instance_id = aws.run_instance()
        server = imds.make_server(instance_id, aws.url, REGION).start()
        try:
            reply = get(server.url, "/latest/meta-data/instance-id")
        finally:
            server.stop()
        assert (reply.status, reply.body) == (200, instance_id)
        with pytest.raises(socket.timeout):
            trap.accept()


# --- paths -------------------------------------------------------------------


def test_instance_paths_and_identity_document(aws: Aws, start_imds: StartImds) -> None:
    instance_id = aws.run_instance()
    url = start_imds(instance_id)
    account = aws.sts.get_caller_identity()["Account"]
    assert get(url, "/latest/meta-data/instance-id").body == instance_id
    assert get(url, "/latest/meta-data/placement/region").body == REGION
    assert get(url, "/latest/meta-data/placement/availability-zone").body == f"{REGION}a"
    document = get(url, "/latest/dynamic/instance-identity/document").json()
    assert (document["instanceId"], document["region"], document["accountId"]) == (
        instance_id,
        REGION,
        account,
    )
    assert document["availabilityZone"] == f"{REGION}a"
    listing = get(url, "/latest/meta-data/").body.split("\n")
    assert {"instance-id", "placement/", "ami-id"} <= set(listing)
    assert "iam/" not in listing
    assert get(url, "/latest/meta-data/no-such-thing").status == 404


@pytest.mark.parametrize(
    "path",
    [
        "/latest/meta-data/iam/info",
        "/latest/meta-data/iam/security-credentials/",
        "/latest/meta-data/iam/security-credentials/any-role",
        "/latest/meta-data/iam/",
    ],
)
def test_iam_paths_are_404_without_association(aws: Aws, start_imds: StartImds, path: str) -> None:
    instance_id = aws.run_instance()
    url = start_imds(instance_id)
    # A profile associated with *another* instance must not leak.
    _, profile = aws.role_profile("other")
    aws.associate(aws.run_instance(), profile)
    assert get(url, path).status == 404


def test_credentials_of_the_associated_role(aws: Aws, start_imds: StartImds) -> None:
    instance_id = aws.run_instance()
    url = start_imds(instance_id, credential_lifetime=3600)
    role, profile = aws.role_profile("mailer")
    aws.associate(instance_id, profile)

    assert "iam/" in get(url, "/latest/meta-data/").body.split("\n")
    info = get(url, "/latest/meta-data/iam/info").json()
    described = aws.iam.get_instance_profile(InstanceProfileName=profile)["InstanceProfile"]
    assert info["Code"] == "Success"
    assert info["InstanceProfileArn"] == described["Arn"]
    assert info["InstanceProfileId"] == described["InstanceProfileId"]

    assert get(url, "/latest/meta-data/iam/security-credentials/").body == role
    first = get(url, f"/latest/meta-data/iam/security-credentials/{role}").json()
    assert set(first) == {
        "Code",
        "LastUpdated",
        "Type",
        "AccessKeyId",
        "SecretAccessKey",
        "Token",
        "Expiration",
    }
    assert (first["Code"], first["Type"]) == ("Success", "AWS-HMAC")
    issued = epoch(first["LastUpdated"])
    assert epoch(first["Expiration"]) - issued == 3600
    assert abs(issued - time.time()) < 5
    assert aws.caller_arn(first).endswith(f":assumed-role/{role}/{instance_id}")

    again = get(url, f"/latest/meta-data/iam/security-credentials/{role}").json()
    assert again["AccessKeyId"] == first["AccessKeyId"], "credentials are cached"
    assert get(url, "/latest/meta-data/iam/security-credentials/not-my-role").status == 404


def test_profile_without_role_has_info_but_no_credentials(aws: Aws, start_imds: StartImds) -> None:
    instance_id = aws.run_instance()
    url = start_imds(instance_id)
    profile = f"empty-profile-{next(_names)}"
    aws.iam.create_instance_profile(InstanceProfileName=profile)
    aws.associate(instance_id, profile)
    assert get(url, "/latest/meta-data/iam/info").status == 200
    assert get(url, "/latest/meta-data/iam/security-credentials/").status == 404


def test_role_switch_after_reassociation(aws: Aws, start_imds: StartImds) -> None:
    instance_id = aws.run_instance()
    url = start_imds(instance_id)
    old_role, old_profile = aws.role_profile("legacy")
    new_role, new_profile = aws.role_profile("mailer")
    association = aws.associate(instance_id, old_profile)
    old = get(url, f"/latest/meta-data/iam/security-credentials/{old_role}").json()
    assert aws.caller_arn(old).endswith(f":assumed-role/{old_role}/{instance_id}")

    aws.ec2.replace_iam_instance_profile_association(
        AssociationId=association, IamInstanceProfile={"Name": new_profile}
    )
    assert get(url, "/latest/meta-data/iam/security-credentials/").body == new_role
    assert get(url, f"/latest/meta-data/iam/security-credentials/{old_role}").status == 404
    new = get(url, f"/latest/meta-data/iam/security-credentials/{new_role}").json()
    assert new["AccessKeyId"] != old["AccessKeyId"]
    assert aws.caller_arn(new).endswith(f":assumed-role/{new_role}/{instance_id}")

    aws.ec2.disassociate_iam_instance_profile(AssociationId=association)
    assert get(url, "/latest/meta-data/iam/security-credentials/").status == 404


def test_new_credentials_after_expiration(aws: Aws, start_imds: StartImds) -> None:
    instance_id = aws.run_instance()
    url = start_imds(instance_id, credential_lifetime=2)
    role, profile = aws.role_profile("short")
    aws.associate(instance_id, profile)
    path = f"/latest/meta-data/iam/security-credentials/{role}"
    first = get(url, path).json()
    wait = epoch(first["Expiration"]) - time.time()
    assert 0 < wait <= 2
    time.sleep(wait + 0.1)
    second = get(url, path).json()
    assert second["AccessKeyId"] != first["AccessKeyId"]
    assert second["Expiration"] > first["Expiration"]


# --- boto3 in a child process, credentials from the fake IMDS only ------------

# The child asks for its caller identity, sleeps, then asks again with the same
# session and with a new one (each timer run of the mail program is a new
# process, hence a new session).
CHILD = """
import json, sys, time
import boto3
from botocore.exceptions import NoCredentialsError
session = boto3.Session()
try:
    first = session.client("sts").get_caller_identity()["Arn"]
except NoCredentialsError:
    print(json.dumps({"credentials": None}))
    sys.exit(0)
credentials = session.get_credentials()
time.sleep(float(sys.argv[1]))
same = session.client("sts").get_caller_identity()["Arn"]
fresh_session = boto3.Session()
fresh = fresh_session.client("sts").get_caller_identity()["Arn"]
print(json.dumps({
    "credentials": credentials.method,
    "arns": [first, same, fresh],
    "keys": [
        credentials.get_frozen_credentials().access_key,
        fresh_session.get_credentials().get_frozen_credentials().access_key,
    ],
}))
"""


def run_child(aws: Aws, imds_url: str, home: Path, sleep: float = 0) -> dict[str, Any]:
    env = loopback_env(moto_url=aws.url, imds_url=imds_url, home=home)
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_EC2_METADATA_DISABLED" not in env
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(sleep)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_boto3_child_gets_role_credentials_via_imdsv2(
    aws: Aws, start_imds: StartImds, tmp_path: Path
) -> None:
    instance_id = aws.run_instance(http_tokens="required")
    url = start_imds(instance_id)
    assert run_child(aws, url, tmp_path) == {"credentials": None}

    role, profile = aws.role_profile("mailer")
    aws.associate(instance_id, profile)
    result = run_child(aws, url, tmp_path)
    account = aws.sts.get_caller_identity()["Account"]
    expected = f"arn:aws:sts::{account}:assumed-role/{role}/{instance_id}"
    print("child caller identity:", result["arns"][0])
    assert result["credentials"] == "iam-role"
    assert result["arns"] == [expected, expected, expected]
    assert result["keys"][0] == result["keys"][1], "one lifetime: both sessions share the keys"


def test_boto3_child_gets_new_credentials_after_expiration(
    aws: Aws, start_imds: StartImds, tmp_path: Path
) -> None:
    """A new boto3 session after the lifetime gets the new keys.

    botocore extends IMDS credentials that expire within its refresh window
    (15 min plus 2-10 min of jitter) instead of refreshing them, so an open
    session keeps working on the old keys here; only real lifetimes (6 h)
    make it refresh in place.
    """
    instance_id = aws.run_instance(http_tokens="required")
    url = start_imds(instance_id, credential_lifetime=2)
    role, profile = aws.role_profile("short")
    aws.associate(instance_id, profile)
    result = run_child(aws, url, tmp_path, sleep=2.5)
    assert result["credentials"] == "iam-role"
    assert len(result["arns"]) == 3
    assert all(arn.endswith(f":assumed-role/{role}/{instance_id}") for arn in result["arns"])
    old_key, new_key = result["keys"]
    assert old_key != new_key, "the fake IMDS served expired credentials to a new session"


# --- the command line --------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.mark.parametrize(
    ("bad", "scenario"),
    [
        # Refused values are built from parts so the static scan does not flag them.
        (["--host", ".".join("0" * 4)], "wildcard bind address"),
        (["--moto-url", "http" + "://moto.invalid:5000"], "moto on a non-loopback name"),
        (["--moto-url", "127.0.0.1:5000"], "moto URL without a scheme"),
        (["--credential-lifetime", "0"], "zero lifetime"),
    ],
)
def test_cli_refuses_unsafe_arguments(bad: list[str], scenario: str, tmp_path: Path) -> None:
    args = [
        "--port",
        str(free_port()),
        "--instance-id",
        "i-0",
        "--moto-url",
        "http://127.0.0.1:9",
        "--region",
        REGION,
        *bad,
    ]
    done = subprocess.run(
        [sys.executable, str(REPO / "lab" / "imds.py"), *args],
        env=loopback_env(home=tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, scenario
    assert done.stdout == ""
    assert done.stderr.strip().splitlines()[-1].startswith("imds.py: error: argument --")


def test_cli_serves_and_stops_on_sigterm(aws: Aws, tmp_path: Path) -> None:
    instance_id = aws.run_instance()
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "lab" / "imds.py"),
            "--port",
            str(port),
            "--instance-id",
            instance_id,
            "--moto-url",
            aws.url,
            "--region",
            REGION,
        ],
        env=loopback_env(home=tmp_path),
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(100):
            try:
                reply = get(url, "/latest/meta-data/instance-id")
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("imds.py did not start listening within 10 s")
        assert (reply.status, reply.body) == (200, instance_id)
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0
    lines = stderr.strip().splitlines()
    assert lines[0].startswith(f"imds {instance_id} listening on {url}")
    assert f"imds {instance_id} 127.0.0.1 PUT /latest/api/token 200" in lines
    assert f"imds {instance_id} 127.0.0.1 GET /latest/meta-data/instance-id 200" in lines
