"""The ses_mailer role's spec, defaults, README and templates agree.

The defaults-versus-spec check for every role's top-level variables lives in
``tests/test_docs.py``; these tests cover what is nested (a job item's keys),
the role's README, and the unit and job files the templates render (rendered by
ansible-playbook on localhost, no host touched).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.safety import loopback_env

REPO = Path(__file__).resolve().parents[2]
ROLE = REPO / "roles" / "ses_mailer"
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
HEADER = "# This file is managed by Ansible (role ses_mailer); local changes are overwritten."


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def spec_options() -> dict[str, Any]:
    options: dict[str, Any] = load(ROLE / "meta" / "argument_specs.yml")["argument_specs"]["main"][
        "options"
    ]
    return options


def defaults() -> dict[str, Any]:
    values: dict[str, Any] = load(ROLE / "defaults" / "main.yml")
    return values


def test_job_item_options_are_the_job_defaults_plus_the_required_keys() -> None:
    job_options = spec_options()["ses_mailer_jobs"]["options"]
    job_defaults = defaults()["ses_mailer_job_defaults"]
    assert set(job_options) == set(job_defaults) | {"name", "schedule", "config"}
    for key in ("name", "schedule", "config"):
        assert key not in job_defaults, key


def test_job_defaults_are_allowed_values_of_their_options() -> None:
    job_options = spec_options()["ses_mailer_jobs"]["options"]
    type_of = {"str": str, "bool": bool, "dict": dict}
    for key, value in defaults()["ses_mailer_job_defaults"].items():
        option = job_options[key]
        assert isinstance(value, type_of[option["type"]]), (key, value)
        if "choices" in option:
            assert value in option["choices"], (key, value)
        assert "default" not in option, f"{key}: its default belongs in ses_mailer_job_defaults"


def test_readme_names_every_variable_and_job_key() -> None:
    readme = (ROLE / "README.md").read_text(encoding="utf-8")
    for name in spec_options():
        assert f"`{name}`" in readme, name
    for key in spec_options()["ses_mailer_jobs"]["options"]:
        assert f"| `{key}` |" in readme, key


def test_sandbox_defaults_are_systemd_directives_with_renderable_values() -> None:
    for key, value in defaults()["ses_mailer_sandbox"].items():
        assert key[:1].isupper() and key.isalnum(), key
        assert isinstance(value, (str, bool, list)), (key, value)


RENDER_VARS: dict[str, Any] = {
    "ses_mailer_environment": {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:24999",
        "ODD": 'say "hi" at 50% \\ done',
    },
    "ses_mailer_region": "eu-west-1",
    "ses_mailer_jobs": [
        {
            "name": "plain",
            "schedule": "Mon..Fri 07:30 Europe/Berlin",
            "on_failure": "log",
            "config": {
                "from": "a@example.com",
                "to": ["b@example.com"],
                "subject": "s",
                "text": "t",
            },
        },
        {
            "name": "cmd",
            "schedule": "daily",
            "persistent": False,
            "randomized_delay": "5min",
            "accuracy": "1s",
            "timeout": "10min",
            "sandbox": {
                "ProtectHome": "read-only",
                "MemoryDenyWriteExecute": None,
                "ReadWritePaths": ["/srv/a", "-/srv/b"],
            },
            "config": {
                "from": "a@example.com",
                "to": ["b@example.com"],
                "subject": "s",
                "region": "us-west-2",
                "command": {"argv": ["/bin/true"]},
            },
        },
    ],
}

RENDER_PLAYBOOK = """\
- name: Render the ses_mailer templates
  hosts: localhost
  connection: local
  gather_facts: false
  vars:
    role_path: {role}
  tasks:
    - name: Load the defaults, the test values, then the role's internal values
      ansible.builtin.include_vars:
        file: "{{{{ item }}}}"
      loop: ["{role}/defaults/main.yml", "{test_vars}", "{role}/vars/main.yml"]
    - name: Render the job templates
      ansible.builtin.template:
        src: "{role}/templates/{{{{ _p.1 }}}}.j2"
        dest: "{out}/{{{{ _p.0.name }}}}{{{{ _p.1 | regex_replace('^job', '') }}}}"
        mode: "0644"
      vars:
        item: "{{{{ _p.0 }}}}"
        _ses_mailer_job_name: "{{{{ _p.0.name }}}}"
        _ses_mailer_job_config: "{{{{ _p.0.config }}}}"
        _ses_mailer_job_sandbox: "{{{{ _p.0.sandbox }}}}"
      loop: "{{{{ _ses_mailer_jobs | product(['job.service', 'job.timer', 'job.json']) | list }}}}"
      loop_control:
        loop_var: _p
"""


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("render")
    out = work / "out"
    out.mkdir()
    test_vars = work / "vars.yml"
    test_vars.write_text(yaml.safe_dump(RENDER_VARS), encoding="utf-8")
    playbook = work / "render.yml"
    playbook.write_text(
        RENDER_PLAYBOOK.format(role=ROLE, test_vars=test_vars, out=out), encoding="utf-8"
    )
    env = loopback_env(
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        ANSIBLE_LOCAL_TEMP=str(work / "tmp"),
        ANSIBLE_HOME=str(work / "ansible-home"),
    )
    result = subprocess.run(
        [
            str(ANSIBLE_PLAYBOOK),
            "--inventory=localhost,",
            f"--extra-vars=ansible_python_interpreter={sys.executable}",
            str(playbook),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {path.name: path.read_text(encoding="utf-8") for path in out.iterdir()}


def directives(unit: str) -> list[tuple[str, str]]:
    """(key, value) of every directive line, in order (repeated keys kept)."""
    pairs = []
    for line in unit.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            pairs.append((key, value))
    return pairs


def values(unit: str, key: str) -> list[str]:
    return [value for name, value in directives(unit) if name == key]


def test_service_is_a_oneshot_without_install_section_or_timer_dependency(
    rendered: dict[str, str],
) -> None:
    unit = rendered["plain.service"]
    assert unit.splitlines()[0] == HEADER
    assert "[Install]" not in unit.splitlines()
    assert values(unit, "Type") == ["oneshot"]
    assert values(unit, "User") == ["ses-mailer"]
    assert values(unit, "ExecStart") == [
        "/usr/bin/python3 /usr/local/lib/ses-mailer/ses_mailer.py"
        " --job /etc/ses-mailer/jobs/plain.json"
    ]
    assert values(unit, "StateDirectory") == ["ses-mailer/plain"]
    assert values(unit, "SyslogIdentifier") == ["plain"]
    assert values(unit, "OnFailure") == ["ses-mailer-failure-log@plain.service"]
    for key in ("Requires", "Wants", "BindsTo", "PartOf", "Requisite", "After"):
        assert not any(".timer" in value for value in values(unit, key)), key


def test_environment_values_are_quoted_and_escaped_for_systemd(rendered: dict[str, str]) -> None:
    environment = values(rendered["plain.service"], "Environment")
    assert '"AWS_ENDPOINT_URL=http://127.0.0.1:24999"' in environment
    assert '"ODD=say \\"hi\\" at 50%% \\\\ done"' in environment


def test_default_sandbox_renders_booleans_lists_and_empty_values(rendered: dict[str, str]) -> None:
    unit = rendered["plain.service"]
    assert values(unit, "ProtectSystem") == ["strict"]
    assert values(unit, "NoNewPrivileges") == ["yes"]
    assert values(unit, "MemoryDenyWriteExecute") == ["yes"]
    assert values(unit, "CapabilityBoundingSet") == [""]
    assert values(unit, "SystemCallFilter") == ["@system-service", "~@privileged @resources"]
    assert values(unit, "UMask") == ["0077"]


def test_job_sandbox_overrides_drops_and_extends_only_its_own_service(
    rendered: dict[str, str],
) -> None:
    cmd = rendered["cmd.service"]
    assert values(cmd, "ProtectHome") == ["read-only"]
    assert values(cmd, "MemoryDenyWriteExecute") == []
    assert values(cmd, "ReadWritePaths") == ["/srv/a", "-/srv/b"]
    assert values(cmd, "OnFailure") == []
    assert values(cmd, "TimeoutStartSec") == ["10min"]
    plain = rendered["plain.service"]
    assert values(plain, "ProtectHome") == ["yes"]
    assert values(plain, "ReadWritePaths") == []


def test_timer_carries_schedule_defaults_and_install_section(rendered: dict[str, str]) -> None:
    plain = rendered["plain.timer"]
    assert plain.splitlines()[0] == HEADER
    assert values(plain, "Unit") == ["plain.service"]
    assert values(plain, "OnCalendar") == ["Mon..Fri 07:30 Europe/Berlin"]
    assert values(plain, "Persistent") == ["true"]
    assert values(plain, "RandomizedDelaySec") == ["0"]
    assert values(plain, "AccuracySec") == ["1min"]
    assert values(plain, "WantedBy") == ["timers.target"]
    cmd = rendered["cmd.timer"]
    assert values(cmd, "Persistent") == ["false"]
    assert values(cmd, "RandomizedDelaySec") == ["5min"]
    assert values(cmd, "AccuracySec") == ["1s"]


def test_job_file_gets_the_name_and_the_region_only_when_it_has_none(
    rendered: dict[str, str],
) -> None:
    plain = json.loads(rendered["plain.json"])
    assert plain == {
        "from": "a@example.com",
        "name": "plain",
        "region": "eu-west-1",
        "subject": "s",
        "text": "t",
        "to": ["b@example.com"],
    }
    cmd = json.loads(rendered["cmd.json"])
    assert cmd["name"] == "cmd"
    assert cmd["region"] == "us-west-2"
    assert cmd["command"] == {"argv": ["/bin/true"]}
