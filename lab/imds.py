"""A fake EC2 instance metadata service (IMDSv2) for one lab host.

The lab runs one per host on loopback, bound to that host's instance id:

    python lab/imds.py --port 24151 --instance-id i-0123 \\
        --moto-url http://127.0.0.1:24100 --region us-east-1

It follows EC2's rules where the project depends on them:

* ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds``
  (1..21600) returns a session token and echoes the TTL; a missing or invalid
  TTL is 400; a PUT carrying ``X-Forwarded-For`` is 403 (EC2 refuses tokens
  to proxied requests). Tokens expire after their TTL.
* A GET with ``X-aws-ec2-metadata-token`` is served when the token is valid and
  is 401 when it is unknown or expired. A GET without it is 401 when the
  instance's ``MetadataOptions.HttpTokens`` is ``required`` (or absent) and
  served when it is ``optional``. ``HttpEndpoint: disabled`` makes every
  request 403, as EC2 answers when the endpoint is turned off. The options are
  read from moto on every request.
* ``meta-data/iam/info`` and ``meta-data/iam/security-credentials/`` are 404
  while no instance profile is associated with *this* instance;
  ``security-credentials/`` is also 404 when the associated profile holds no
  role; a role name other than the current one is 404.
* Credentials come from STS ``AssumeRole`` (session name: the instance id) for
  the role in the profile moto currently associates with the instance. They
  are reused until shortly before their expiration (at most 5 minutes before,
  a quarter of the lifetime for short ones), and a re-association to a profile
  with another role switches at once. ``Expiration`` is the issue time plus
  the credential lifetime (6 hours as on EC2, shorter for tests).

It talks to nothing but the loopback moto URL it is given, and logs one line
per request to stderr.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Callable
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

DEFAULT_CREDENTIAL_LIFETIME = 6 * 3600
TOKEN_TTL_MIN = 1
TOKEN_TTL_MAX = 21600
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105 - a header name, not a secret
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MAX_REFRESH_MARGIN = 300.0
DUMMY_KEY = "testing"

EX_OK = 0
EX_OSERR = 71  # the port could not be bound


class MotoUnavailableError(Exception):
    """moto could not answer a question the response depends on."""


# --- loopback checks ---------------------------------------------------------


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` or an IP literal in 127.0.0.0/8 or ::1."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_host(value: str) -> str:
    """argparse type: a loopback address to bind to."""
    if not is_loopback_host(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a loopback address")
    return value


def loopback_url(value: str) -> str:
    """argparse type: an http(s) URL whose host is loopback."""
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or host is None or not is_loopback_host(host):
        raise argparse.ArgumentTypeError(f"{value!r} is not an http(s) URL on loopback")
    return value


def positive_int(value: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return number


# --- what moto knows about the instance --------------------------------------


@dataclass(frozen=True)
class Profile:
    """The instance profile associated with the instance, and its role."""

    arn: str
    profile_id: str
    role_arn: str | None

    @property
    def role_name(self) -> str | None:
        if self.role_arn is None:
            return None
        return self.role_arn.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Issued:
    """One set of role credentials and when they were issued."""

    role_arn: str
    access_key_id: str
    secret_access_key: str
    session_token: str
    last_updated: float
    expiration: float
    refresh_at: float


class Moto:
    """The few questions the metadata service asks moto, with explicit endpoint and dummy keys."""

    def __init__(self, moto_url: str, region: str, instance_id: str) -> None:
        self.instance_id = instance_id
        session = boto3.session.Session(
            aws_access_key_id=DUMMY_KEY,
            aws_secret_access_key=DUMMY_KEY,
            region_name=region,
        )
        config = Config(
            retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=5,
            read_timeout=15,
            proxies={},  # never a proxy from the environment: moto directly
        )
        self._ec2 = session.client("ec2", endpoint_url=moto_url, config=config)
        self._iam = session.client("iam", endpoint_url=moto_url, config=config)
        self._sts = session.client("sts", endpoint_url=moto_url, config=config)

    def _ask(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (BotoCoreError, ClientError) as exc:
            raise MotoUnavailableError(f"{what}: {exc}") from exc

    def instance(self) -> dict[str, Any]:
        """The instance's DescribeInstances record plus ``OwnerId``."""
        answer = self._ask(
            "DescribeInstances",
            lambda: self._ec2.describe_instances(InstanceIds=[self.instance_id]),
        )
        for reservation in answer.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                if instance.get("InstanceId") == self.instance_id:
                    record = dict(instance)
                    record["OwnerId"] = reservation.get("OwnerId", "")
                    return record
        raise MotoUnavailableError(f"moto has no instance {self.instance_id}")

    def profile(self) -> Profile | None:
        """The profile associated with this instance (state ``associated``), if any."""
        answer = self._ask(
            "DescribeIamInstanceProfileAssociations",
            lambda: self._ec2.describe_iam_instance_profile_associations(
                Filters=[
                    {"Name": "instance-id", "Values": [self.instance_id]},
                    {"Name": "state", "Values": ["associated"]},
                ]
            ),
        )
        associations = [
            a
            for a in answer.get("IamInstanceProfileAssociations", [])
            if a.get("InstanceId") == self.instance_id and a.get("State") == "associated"
        ]
        if not associations:
            return None
        reference = associations[0].get("IamInstanceProfile", {})
        arn = str(reference.get("Arn", ""))
        name = arn.rsplit("/", 1)[-1]
        details = self._ask(
            "GetInstanceProfile",
            lambda: self._iam.get_instance_profile(InstanceProfileName=name),
        )["InstanceProfile"]
        roles = details.get("Roles", [])
        return Profile(
            arn=arn,
            profile_id=str(reference.get("Id") or details.get("InstanceProfileId", "")),
            role_arn=str(roles[0]["Arn"]) if roles else None,
        )

    def assume_role(self, role_arn: str, duration: int) -> dict[str, Any]:
        """STS AssumeRole for ``role_arn`` with the instance id as session name."""
        answer = self._ask(
            "AssumeRole",
            lambda: self._sts.assume_role(
                RoleArn=role_arn,
                RoleSessionName=self.instance_id,
                DurationSeconds=duration,
            ),
        )
        credentials: dict[str, Any] = answer["Credentials"]
        return credentials


# --- the metadata service ----------------------------------------------------


def iso_z(epoch: float) -> str:
    """ISO-8601 in UTC with a ``Z``, to the second, as EC2 writes it."""
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Reply:
    status: int
    body: str = ""
    headers: tuple[tuple[str, str], ...] = ()


NOT_FOUND = Reply(404, "Not Found\n")
UNAUTHORIZED = Reply(401, "Unauthorized\n")
FORBIDDEN = Reply(403, "Forbidden\n")


class MetadataService:
    """Tokens, credentials cache and path resolution; independent of HTTP."""

    def __init__(
        self,
        moto: Moto,
        region: str,
        credential_lifetime: int = DEFAULT_CREDENTIAL_LIFETIME,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.moto = moto
        self.region = region
        self.lifetime = credential_lifetime
        self.clock = clock
        self._tokens: dict[str, float] = {}
        self._issued: dict[str, Issued] = {}
        self._token_lock = threading.Lock()
        self._credential_lock = threading.Lock()

    # tokens

    def new_token(self, ttl: int) -> str:
        token = secrets.token_urlsafe(42)
        now = self.clock()
        with self._token_lock:
            for known, expires in list(self._tokens.items()):
                if expires <= now:
                    del self._tokens[known]
            self._tokens[token] = now + ttl
        return token

    def token_seconds_left(self, token: str) -> int | None:
        """Whole seconds left for a valid token, None for an unknown or expired one."""
        with self._token_lock:
            expires = self._tokens.get(token)
        left = None if expires is None else expires - self.clock()
        if left is None or left <= 0:
            return None
        return max(1, math.floor(left))

    # credentials

    def credentials(self, role_arn: str) -> Issued:
        """Current credentials for ``role_arn``: cached or freshly assumed."""
        with self._credential_lock:
            now = self.clock()
            cached = self._issued.get(role_arn)
            if cached is not None and now < cached.refresh_at:
                return cached
            answer = self.moto.assume_role(role_arn, min(max(900, self.lifetime), 43200))
            issued_at = float(math.floor(now))
            expiration = issued_at + self.lifetime
            margin = min(MAX_REFRESH_MARGIN, max(1.0, self.lifetime / 4))
            issued = Issued(
                role_arn=role_arn,
                access_key_id=str(answer["AccessKeyId"]),
                secret_access_key=str(answer["SecretAccessKey"]),
                session_token=str(answer["SessionToken"]),
                last_updated=issued_at,
                expiration=expiration,
                refresh_at=expiration - margin,
            )
            self._issued[role_arn] = issued
            return issued

    # paths

    def resolve(self, path: str, instance: dict[str, Any]) -> Reply:
        """The reply for a GET of ``path`` (below ``/latest/``, no query)."""
        if path in ("", "/"):
            return Reply(200, "dynamic\nmeta-data")
        if path in ("dynamic", "dynamic/"):
            return Reply(200, "instance-identity/")
        if path in ("dynamic/instance-identity", "dynamic/instance-identity/"):
            return Reply(200, "document")
        if path == "dynamic/instance-identity/document":
            return Reply(200, self.identity_document(instance))
        if path == "meta-data" or path.startswith("meta-data/"):
            return self.meta_data(path[len("meta-data/") :], instance)
        return NOT_FOUND

    def identity_document(self, instance: dict[str, Any]) -> str:
        launch = instance.get("LaunchTime")
        document = {
            "accountId": instance.get("OwnerId", ""),
            "architecture": instance.get("Architecture", "x86_64"),
            "availabilityZone": instance.get("Placement", {}).get("AvailabilityZone", ""),
            "billingProducts": None,
            "devpayProductCodes": None,
            "marketplaceProductCodes": None,
            "imageId": instance.get("ImageId", ""),
            "instanceId": self.moto.instance_id,
            "instanceType": instance.get("InstanceType", ""),
            "kernelId": None,
            "pendingTime": iso_z(launch.timestamp()) if isinstance(launch, datetime) else None,
            "privateIp": instance.get("PrivateIpAddress"),
            "ramdiskId": None,
            "region": self.region,
            "version": "2017-09-30",
        }
        return json.dumps(document, indent=2)

    def meta_data(self, path: str, instance: dict[str, Any]) -> Reply:
        placement = instance.get("Placement", {})
        leaves = {
            "ami-id": instance.get("ImageId"),
            "instance-id": self.moto.instance_id,
            "instance-type": instance.get("InstanceType"),
            "local-hostname": instance.get("PrivateDnsName"),
            "local-ipv4": instance.get("PrivateIpAddress"),
            "placement/availability-zone": placement.get("AvailabilityZone"),
            "placement/region": self.region,
        }
        if path in leaves:
            value = leaves[path]
            return NOT_FOUND if not value else Reply(200, str(value))
        if path.rstrip("/") == "placement":
            return Reply(200, "availability-zone\nregion")
        if path == "iam" or path.startswith("iam/"):
            return self.iam(path[len("iam/") :])
        if path == "":
            names = sorted(
                {k.split("/", 1)[0] + ("/" if "/" in k else "") for k, v in leaves.items() if v}
            )
            if self.moto.profile() is not None:
                names.append("iam/")
            return Reply(200, "\n".join(sorted(names)))
        return NOT_FOUND

    def iam(self, path: str) -> Reply:
        profile = self.moto.profile()
        if profile is None:
            return NOT_FOUND
        if path in ("", "/"):
            return Reply(200, "info\nsecurity-credentials/")
        if path == "info":
            issued = self._issued.get(profile.role_arn or "")
            info = {
                "Code": "Success",
                "LastUpdated": iso_z(issued.last_updated if issued else self.clock()),
                "InstanceProfileArn": profile.arn,
                "InstanceProfileId": profile.profile_id,
            }
            return Reply(200, json.dumps(info, indent=2))
        if profile.role_arn is None or profile.role_name is None:
            return NOT_FOUND
        if path.rstrip("/") == "security-credentials":
            return Reply(200, profile.role_name)
        if path.rstrip("/") == f"security-credentials/{profile.role_name}":
            issued = self.credentials(profile.role_arn)
            body = {
                "Code": "Success",
                "LastUpdated": iso_z(issued.last_updated),
                "Type": "AWS-HMAC",
                "AccessKeyId": issued.access_key_id,
                "SecretAccessKey": issued.secret_access_key,
                "Token": issued.session_token,
                "Expiration": iso_z(issued.expiration),
            }
            return Reply(200, json.dumps(body, indent=2))
        return NOT_FOUND

    # requests

    def put(self, path: str, headers: dict[str, str]) -> Reply:
        """A PUT: only the token path exists."""
        if path != "/latest/api/token":
            return Reply(405, "Method Not Allowed\n", (("Allow", "GET"),))
        if self._endpoint_disabled(self.moto.instance()):
            return FORBIDDEN
        if "x-forwarded-for" in headers:
            return FORBIDDEN
        raw = headers.get(TTL_HEADER.lower(), "").strip()
        if not raw.isdigit() or not TOKEN_TTL_MIN <= int(raw) <= TOKEN_TTL_MAX:
            return Reply(400, "Bad Request\n")
        ttl = int(raw)
        return Reply(200, self.new_token(ttl), ((TTL_HEADER, str(ttl)),))

    def get(self, path: str, headers: dict[str, str]) -> Reply:
        """A GET: token rules first, then the path below ``/latest/``."""
        instance = self.moto.instance()
        if self._endpoint_disabled(instance):
            return FORBIDDEN
        extra: tuple[tuple[str, str], ...] = ()
        token = headers.get(TOKEN_HEADER.lower())
        if token is not None:
            left = self.token_seconds_left(token)
            if left is None:
                return UNAUTHORIZED
            extra = ((TTL_HEADER, str(left)),)
        elif instance.get("MetadataOptions", {}).get("HttpTokens", "required") != "optional":
            return UNAUTHORIZED
        if path == "/":
            return Reply(200, "latest")
        if path != "/latest" and not path.startswith("/latest/"):
            return NOT_FOUND
        reply = self.resolve(path[len("/latest/") :], instance)
        return Reply(reply.status, reply.body, reply.headers + extra)

    @staticmethod
    def _endpoint_disabled(instance: dict[str, Any]) -> bool:
        return bool(instance.get("MetadataOptions", {}).get("HttpEndpoint") == "disabled")


# --- HTTP --------------------------------------------------------------------


class ImdsServer(ThreadingHTTPServer):
    """A threading HTTP server that carries its :class:`MetadataService`."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: MetadataService) -> None:
        self.service = service
        super().__init__(address, ImdsHandler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:24151/``."""
        host, port = self.server_address[:2]
        host_text = host.decode() if isinstance(host, bytes) else str(host)
        if ":" in host_text:
            host_text = f"[{host_text}]"
        return f"http://{host_text}:{port}/"

    def start(self) -> ImdsServer:
        """Serve in a daemon thread (for tests); returns self."""
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


class ImdsHandler(BaseHTTPRequestHandler):
    """Maps HTTP requests onto :class:`MetadataService`."""

    server: ImdsServer
    server_version = "EC2ws"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def _headers(self) -> dict[str, str]:
        return {key.lower(): value for key, value in self.headers.items()}

    def _path(self) -> str:
        return urlsplit(self.path).path or "/"

    def _discard_body(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit():
            self.rfile.read(int(length))

    def _send(self, reply: Reply) -> None:
        payload = reply.body.encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _answer(self, work: Callable[[], Reply]) -> None:
        try:
            reply = work()
        except MotoUnavailableError as exc:
            self.log_message("moto unavailable: %s", exc)
            reply = Reply(503, "Service Unavailable\n")
        self._send(reply)

    def do_PUT(self) -> None:
        self._discard_body()
        self._answer(lambda: self.server.service.put(self._path(), self._headers()))

    def do_GET(self) -> None:
        self._answer(lambda: self.server.service.get(self._path(), self._headers()))

    def _not_allowed(self) -> None:
        self._discard_body()
        self._send(Reply(405, "Method Not Allowed\n", (("Allow", "GET, PUT"),)))

    do_POST = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        status = code.value if hasattr(code, "value") else code
        self.log_message("%s %s %s", self.command, self.path, status)

    def log_message(self, format: str, *args: Any) -> None:
        instance_id = self.server.service.moto.instance_id
        line = format % args
        sys.stderr.write(f"imds {instance_id} {self.client_address[0]} {line}\n")


def make_server(
    instance_id: str,
    moto_url: str,
    region: str,
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    credential_lifetime: int = DEFAULT_CREDENTIAL_LIFETIME,
) -> ImdsServer:
    """Bind a server (port 0: any free port); call ``start()`` or ``serve_forever()``."""
    loopback_host(host)
    loopback_url(moto_url)
    if credential_lifetime < 1:
        raise ValueError("credential_lifetime must be at least 1 second")
    service = MetadataService(Moto(moto_url, region, instance_id), region, credential_lifetime)
    return ImdsServer((host, port), service)


# --- command line ------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument(
        "--host",
        type=loopback_host,
        default="127.0.0.1",
        help="loopback address to listen on (default 127.0.0.1; anything else is refused)",
    )
    parser.add_argument("--instance-id", required=True, help="instance id this service answers for")
    parser.add_argument("--moto-url", type=loopback_url, required=True, help="moto's loopback URL")
    parser.add_argument("--region", required=True, help="region reported by placement/region")
    parser.add_argument(
        "--credential-lifetime",
        type=positive_int,
        default=DEFAULT_CREDENTIAL_LIFETIME,
        help=f"seconds until issued credentials expire (default {DEFAULT_CREDENTIAL_LIFETIME})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run until SIGTERM or SIGINT."""
    args = parse_args(argv)
    try:
        server = make_server(
            args.instance_id,
            args.moto_url,
            args.region,
            port=args.port,
            host=args.host,
            credential_lifetime=args.credential_lifetime,
        )
    except OSError as exc:
        sys.stderr.write(f"imds: cannot listen on {args.host}:{args.port}: {exc.strerror}\n")
        return EX_OSERR

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sys.stderr.write(
        f"imds {args.instance_id} listening on {server.url} (moto {args.moto_url}, "
        f"credential lifetime {args.credential_lifetime}s)\n"
    )
    sys.stderr.flush()
    server.serve_forever()
    server.server_close()
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
