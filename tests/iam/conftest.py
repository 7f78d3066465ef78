"""Fixtures for the AWS-side tests: moto in-process behind the recording proxy."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest
from moto.server import ThreadedMotoServer

from lab.awsproxy import AwsProxy
from tests.iam.iamlab import AwsLab


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def session_proxy(moto_url: str) -> Iterator[AwsProxy]:
    proxy = AwsProxy(moto_url).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture()
def lab(
    request: pytest.FixtureRequest,
    moto_url: str,
    session_proxy: AwsProxy,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[AwsLab]:
    """A fresh name prefix, no faults, no recorded calls."""
    session_proxy.reset()
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[-40:]
    aws_lab = AwsLab(
        moto_url=moto_url,
        proxy=session_proxy,
        prefix=f"t-{slug}",
        workdir=tmp_path_factory.mktemp(slug[:20]),
    )
    yield aws_lab
    session_proxy.reset()
