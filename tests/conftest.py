"""Root conftest: the loopback-only safety guards for the whole pytest session.

Installed in ``pytest_configure``, before any test module is imported, and
checked after every test: a test during which a guard refused something fails,
even if the code under test swallowed the exception. See ``tests/safety.py``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import safety

_saved_environ: dict[str, str] = {}
_scratch: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    """Make the session environment safe and install the socket/subprocess guards."""
    _saved_environ.clear()
    _saved_environ.update(os.environ)
    scratch = tempfile.mkdtemp(prefix="ses-test-session-")
    _scratch.append(scratch)
    try:
        safety.make_session_env_safe(os.environ, scratch)
    except safety.SafetyViolation as exc:
        raise pytest.UsageError(str(exc)) from None
    safety.install_guards()


def pytest_unconfigure(config: pytest.Config) -> None:
    """Undo the guards and give back the environment pytest started with."""
    safety.uninstall_guards()
    os.environ.clear()
    os.environ.update(_saved_environ)
    while _scratch:
        shutil.rmtree(_scratch.pop(), ignore_errors=True)


def _fail_on_refusals() -> None:
    refused = safety.take_violations()
    if refused:
        pytest.fail("safety guard refused during this test:\n" + "\n".join(refused), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Fail the test itself when a guard refused something in its body."""
    try:
        return (yield)
    finally:
        _fail_on_refusals()


@pytest.fixture(autouse=True)
def _safety_guard_record() -> Iterator[None]:
    """Forget earlier refusals; after teardown, fail on those fixtures caused."""
    safety.take_violations()
    yield
    _fail_on_refusals()
