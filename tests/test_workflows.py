"""GitHub Actions workflows: actionlint-clean, pinned, least privilege, real CLI commands."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines import PIPELINES

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
SETUP_ACTION = ROOT / ".github" / "actions" / "setup" / "action.yml"
PINNED = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40}$")


def tool(name: str) -> str:
    """A checker from the dev extra: the virtualenv's copy first, then PATH; never a skip."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found; install the dev tools with `make setup`")
    return found


def actionlint(folder: Path) -> subprocess.CompletedProcess:
    """actionlint on a folder's workflows, with shellcheck on `run:` scripts when there is one."""
    shellcheck = Path(sys.executable).parent / "shellcheck"
    shellcheck_path = str(shellcheck) if shellcheck.exists() else (shutil.which("shellcheck") or "")
    files = sorted(str(p) for p in (folder / ".github" / "workflows").glob("*.yml"))
    return subprocess.run(
        [tool("actionlint"), "-no-color", f"-shellcheck={shellcheck_path}", "-pyflakes=", *files],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
    )


def load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def triggers(workflow: dict) -> dict:
    # YAML 1.1 reads the key `on` as True
    return workflow.get("on", workflow.get(True))


def run_scripts(workflow: dict) -> str:
    return "\n".join(
        step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"]
    )


def test_workflows_are_actionlint_clean():
    assert sorted(p.name for p in WORKFLOWS.glob("*.yml")) == ["ci.yml", "run-pipeline.yml"]
    result = actionlint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_reports_a_broken_workflow(tmp_path):
    # the check above can fail: an unquoted variable (shellcheck) and an unknown action input
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / ".github" / "workflows" / "bad.yml").write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n"
        "      - run: echo $GREETING\n"
        "      - uses: actions/checkout@v5\n"
        "        with:\n          no-such-input: 1\n"
    )
    result = actionlint(tmp_path)
    assert result.returncode == 1
    assert "no-such-input" in result.stdout
    assert "SC2086" in result.stdout


def test_every_action_is_pinned_to_a_commit():
    texts = [p.read_text() for p in [*WORKFLOWS.glob("*.yml"), SETUP_ACTION]]
    uses = [m.group(1) for text in texts for m in re.finditer(r"uses:\s*(\S+)", text)]
    remote = [u for u in uses if not u.startswith("./")]
    assert remote, "no actions found"
    assert [u for u in remote if not PINNED.match(u)] == []
    assert "./.github/actions/setup" in uses


def test_least_privilege_and_concurrency():
    for name in ("ci.yml", "run-pipeline.yml"):
        workflow = load(name)
        assert workflow["permissions"] == {"contents": "read"}, name
        assert "group" in workflow["concurrency"], name
        for job_name, job in workflow["jobs"].items():
            assert job.get("permissions", {"contents": "read"}) == {"contents": "read"}, job_name
            assert "timeout-minutes" in job, job_name
            for step in job["steps"]:
                if step.get("uses", "").startswith("actions/checkout@"):
                    assert step["with"]["persist-credentials"] is False, job_name


def test_ci_lints_tests_and_compiles_every_pull_request():
    workflow = load("ci.yml")
    on = triggers(workflow)
    assert "pull_request" in on and on["push"]["branches"] == ["main"]
    jobs = workflow["jobs"]
    assert "ruff format --check ." in run_scripts({"jobs": {"lint": jobs["lint"]}})
    assert "ruff check ." in run_scripts({"jobs": {"lint": jobs["lint"]}})
    assert "make test" in run_scripts({"jobs": {"test": jobs["test"]}})
    assert "make compile" in run_scripts({"jobs": {"compile": jobs["compile"]}})
    upload = [s for s in jobs["compile"]["steps"] if "upload-artifact" in s.get("uses", "")]
    assert upload and upload[0]["with"]["path"] == "compiled/"
    for name in ("lint", "test", "compile"):
        assert "if" not in jobs[name], f"{name} must run on every pull request"


def test_main_uploads_every_pipeline_after_the_checks():
    upload = load("ci.yml")["jobs"]["upload"]
    assert upload["if"] == "github.event_name == 'push' && github.ref == 'refs/heads/main'"
    assert set(upload["needs"]) == {"lint", "test", "compile"}
    assert upload["env"]["KFP_TOKEN"] == "${{ secrets.KFP_TOKEN }}"
    script = run_scripts({"jobs": {"upload": upload}})
    assert 'python -m pipelines upload "$name" --host "$KFP_HOST"' in script
    assert "from pipelines import PIPELINES" in script


def test_on_demand_run_offers_every_pipeline():
    workflow = load("run-pipeline.yml")
    inputs = triggers(workflow)["workflow_dispatch"]["inputs"]
    assert inputs["pipeline"]["options"] == sorted(PIPELINES)
    assert inputs["params"]["required"] is True
    job = workflow["jobs"]["run"]
    assert job["env"]["KFP_TOKEN"] == "${{ secrets.KFP_TOKEN }}"
    script = run_scripts(workflow)
    assert 'python -m pipelines run "$PIPELINE" --host "$KFP_HOST"' in script
    for flag in ("--experiment", "--params", "--wait", "--version"):
        assert flag in script
    # inputs reach the shell through env, never pasted into the script
    assert "${{" not in script


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("upload", ("--host",)),
        ("run", ("--host", "--experiment", "--params", "--version", "--wait")),
    ],
)
def test_the_workflows_call_flags_the_cli_has(command, flags, capsys):
    from pipelines.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    usage = capsys.readouterr().out
    for flag in flags:
        assert flag in usage
