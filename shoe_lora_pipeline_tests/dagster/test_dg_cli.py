"""The `dg` CLI is how the README runs, checks and lists the project: its commands, `.ci/run`, and what
`dg check defs` / `dg list defs` say about the definitions."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from shoe_lora_pipeline.definitions import build_definitions
from shoe_lora_pipeline_tests.support.dagster_server import dg_command
from shoe_lora_pipeline_tests.support.paths import REPO_ROOT

README = REPO_ROOT / "README.md"


def readme_code() -> str:
    """Every command the README shows: its code blocks and inline code."""
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return "\n".join(blocks + inline)


def quick_start_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", quick, flags=re.S)][:2]


def test_readme_commands_use_dg() -> None:
    code = readme_code()
    assert "dagster asset materialize" not in code
    assert "definitions validate" not in code
    # Plain `dagster dev` only in its workspace form, for deployments that use workspace.yaml.
    plain = [line for line in code.splitlines() if re.search(r"\bdagster dev\b(?! -w workspace\.yaml)", line)]
    assert plain == []
    demo, tests = quick_start_commands()
    assert "dg launch --assets" in demo and "DAGSTER_HOME=$PWD/.dagster_home" in demo
    assert "dg check defs" in tests
    for command in ("dg dev", "dg list defs"):
        assert command in code


def test_ci_runs_exactly_the_readme_test_command() -> None:
    _, tests = quick_start_commands()
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert ci.rstrip().splitlines()[-1] == tests


def test_pyproject_makes_the_repository_a_dg_project() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    dg_config = pyproject["tool"]["dg"]
    assert dg_config["directory_type"] == "project"
    assert dg_config["project"]["code_location_target_module"] == "shoe_lora_pipeline.definitions"
    # workspace.yaml and [tool.dagster] stay for `dagster dev -w workspace.yaml` and plain `dagster dev`.
    assert pyproject["tool"]["dagster"]["module_name"] == "shoe_lora_pipeline.definitions"
    assert (REPO_ROOT / "workspace.yaml").is_file()


def run_dg(*args: str, home: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DAGSTER_HOME": home}
    env.pop("SHOE_LORA_CONFIG", None)  # the demo config, as the README runs it
    return subprocess.run(
        dg_command(*args), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def dagster_home(tmp_path):
    (tmp_path / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    return str(tmp_path)


def test_dg_check_defs_and_list_defs_see_the_definitions(dagster_home: str) -> None:
    check = run_dg("check", "defs", home=dagster_home)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "All definitions loaded successfully" in check.stdout + check.stderr
    assert "Warning" not in check.stdout + check.stderr

    listed = run_dg("list", "defs", "--json", home=dagster_home)
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    defs = build_definitions()
    expected = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {a["asset_key"] for a in data["assets"]} == expected
    assert {j["name"] for j in data["jobs"]} >= {"retrain_job", "dataset_job"}
