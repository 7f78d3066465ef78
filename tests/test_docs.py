"""The README stays true to the code: variables, commands and CI entry point."""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import role_vars  # noqa: E402


def readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def test_role_variable_table_matches_argument_specs_and_defaults() -> None:
    block = role_vars.current_block(readme())
    assert block is not None, "README.md lost the role-vars markers"
    assert block == role_vars.render(), "run: .venv/bin/python tools/role_vars.py --write"


def test_every_default_is_specified_and_every_option_has_its_default() -> None:
    for role in role_vars.roles():
        spec = role_vars.load_yaml(REPO / "roles" / role / "meta" / "argument_specs.yml")
        defaults = role_vars.load_yaml(REPO / "roles" / role / "defaults" / "main.yml")
        options = spec["argument_specs"]["main"]["options"]
        assert set(defaults) <= set(options), f"{role}: defaults not in the spec"
        for name, option in options.items():
            assert name.startswith(f"{role}_"), f"{role}: {name} lacks the role prefix"
            if "default" in option:
                assert name in defaults, f"{role}: {name} has a spec default but none in defaults"
                assert option["default"] == defaults[name], f"{role}: {name} defaults disagree"


def test_readme_has_exactly_the_two_setup_commands() -> None:
    text = readme()
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)
    shell = [body for lang, body in blocks if lang in ("sh", "bash", "console")]
    assert shell, "README has no command block"
    first = shell[0].strip().splitlines()
    assert first == ["make demo", "make test"], first


def test_ci_runs_the_readme_test_command() -> None:
    run = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^exec make test$", run, re.M)
