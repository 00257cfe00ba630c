"""``python -m pipelines upload|run`` against a stand-in of the KFP v2beta1 API.

The stand-in (``tests/kfp_api_standin.py``) records every request kfp.Client sends; the tests
check what reached it: the upload sequence, the Authorization header, the run's parameters, and
that ``run --wait`` exits by the run's final state and prints where to look.
"""

import subprocess

import pytest
import yaml
from kfp_api_standin import KfpApiStandIn

from alignpipe import tracking
from pipelines import kfp_client
from pipelines.__main__ import main

PARAMS = {
    "sft_inputs": ["s3://data/sft.jsonl"],
    "preference_inputs": ["s3://data/votes.jsonl"],
    "sft_config": {"training": {"max_steps": 500}},
    "accelerator_count": 2,
}


@pytest.fixture
def api(monkeypatch, tmp_path):
    for name in (kfp_client.TOKEN_ENV, kfp_client.HOST_ENV, kfp_client.UI_HOST_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # no service-account token here unless a test writes one
    monkeypatch.setenv(kfp_client.SA_TOKEN_ENV, str(tmp_path / "no-token"))
    standin = KfpApiStandIn().start()
    yield standin
    standin.stop()


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(PARAMS))
    return path


def upload(api, version):
    return main(["upload", "dpo", "--host", api.url, "--version", version])


def run(api, params_file, *extra):
    argv = ["run", "dpo", "--host", api.url, "--experiment", "ci", "--params", str(params_file)]
    return main([*argv, "--poll", "0.01", *extra])


def test_first_upload_creates_the_pipeline_then_the_version(api, capsys):
    assert upload(api, "v1") == 0

    [created] = api.calls("POST", "/pipelines/upload")
    [version] = api.calls("POST", "/pipelines/upload_version")
    assert api.requests.index(created) < api.requests.index(version)
    assert created.query["name"] == "alignpipe-dpo"
    assert b"pipelineInfo" in created.body and b"exec-dpo" in created.body  # the compiled YAML
    pipeline_id = next(iter(api.pipelines))
    assert version.query == {**version.query, "name": "v1", "pipelineid": pipeline_id}
    out = capsys.readouterr().out
    assert "alignpipe-dpo: created" in out and "version v1: uploaded" in out


def test_a_second_upload_adds_a_version_only(api, capsys):
    upload(api, "v1")
    assert upload(api, "v2") == 0
    assert len(api.calls("POST", "/pipelines/upload")) == 1
    assert [r.query["name"] for r in api.calls("POST", "/pipelines/upload_version")] == [
        "v1",
        "v2",
    ]
    # the same version again (CI re-run on one commit) uploads nothing
    assert upload(api, "v2") == 0
    assert len(api.calls("POST", "/pipelines/upload_version")) == 2
    assert "version v2: already uploaded" in capsys.readouterr().out


def test_the_token_reaches_every_request(api, monkeypatch):
    monkeypatch.setenv(kfp_client.TOKEN_ENV, "ci-token-123")
    upload(api, "v1")
    assert api.requests
    assert {r.headers.get("authorization") for r in api.requests} == {"Bearer ci-token-123"}


def test_the_service_account_token_file_is_used_without_kfp_token(api, monkeypatch, tmp_path):
    token = tmp_path / "token"
    token.write_text("projected-sa-token\n")
    monkeypatch.setenv(kfp_client.SA_TOKEN_ENV, str(token))
    monkeypatch.setenv(kfp_client.HOST_ENV, api.url)  # the default host
    assert main(["upload", "dpo", "--version", "v1"]) == 0
    assert {r.headers.get("authorization") for r in api.requests} == {"Bearer projected-sa-token"}


def test_no_credentials_sends_no_authorization(api):
    upload(api, "v1")
    assert all("authorization" not in r.headers for r in api.requests)


@pytest.mark.parametrize(("final", "code"), [("SUCCEEDED", 0), ("FAILED", 1), ("CANCELED", 1)])
def test_run_wait_exits_by_the_final_state(api, params_file, capsys, final, code):
    upload(api, "v1")
    api.run_states = ["PENDING", "RUNNING", final]
    assert run(api, params_file, "--wait") == code
    [run_id] = api.runs
    assert len(api.calls("GET", f"/runs/{run_id}")) == 3
    out = capsys.readouterr().out
    assert f"KFP run: {api.url}/#/runs/details/{run_id}" in out
    assert f"KFP run {run_id}: {final}" in out


def test_run_sends_the_yaml_parameters_to_the_chosen_version(api, params_file, capsys):
    upload(api, "v1")
    upload(api, "v2")
    assert run(api, params_file, "--version", "v1") == 0
    [request] = api.calls("POST", "/runs")
    body = request.json()
    assert body["runtime_config"]["parameters"] == PARAMS
    pipeline_id = next(iter(api.pipelines))
    v1 = next(v for v in api.versions[pipeline_id] if v["display_name"] == "v1")
    assert body["pipeline_version_reference"] == {
        "pipeline_id": pipeline_id,
        "pipeline_version_id": v1["pipeline_version_id"],
    }
    # the experiment was missing, so it was created, under the name given
    [created] = api.calls("POST", "/experiments")
    assert created.json()["display_name"] == "ci"
    assert body["experiment_id"] == next(iter(api.experiments))
    # no --wait: the run is started and not polled
    [run_id] = api.runs
    assert not api.calls("GET", f"/runs/{run_id}")

    # no --service-account: the namespace's default runner
    assert not body.get("service_account")

    # a second run finds the experiment and the newest version, and runs as the account given
    assert run(api, params_file, "--service-account", "alignpipe-runner") == 0
    assert len(api.calls("POST", "/experiments")) == 1
    second = api.calls("POST", "/runs")[1].json()
    newest = second["pipeline_version_reference"]
    assert newest["pipeline_version_id"] == api.versions[pipeline_id][-1]["pipeline_version_id"]
    assert second["service_account"] == "alignpipe-runner"


def test_run_prints_the_mlflow_parent_run(api, params_file, tmp_path, capsys):
    upload(api, "v1")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params_file.write_text(yaml.safe_dump({**PARAMS, "tracking_uri": uri}))
    # the run the stand-in will create; its start step would open this parent run
    run_id = api.next_run_id = "run-with-parent"
    parent = tracking.open_pipeline_run(uri, "alignpipe", "dpo", run_id)
    assert run(api, params_file, "--wait") == 0
    assert next(iter(api.runs)) == run_id
    out = capsys.readouterr().out
    assert f"MLflow parent run: run {parent} in experiment" in out


def test_mlflow_line_without_a_tracking_uri_says_how_to_find_the_run(api, params_file, capsys):
    upload(api, "v1")
    run(api, params_file)
    [run_id] = api.runs
    assert f"tagged alignpipe.kfp_run_id={run_id}; set MLFLOW_TRACKING_URI" in (
        capsys.readouterr().out
    )


def test_an_http_tracking_uri_gives_the_ui_url_without_the_password(monkeypatch):
    class Info:
        experiment_id, run_id = "3", "abc"

    assert kfp_client.parent_run_url("https://bot:pw@mlflow.example.com/", Info()) == (
        "https://bot:***@mlflow.example.com/#/experiments/3/runs/abc"
    )


def test_bad_parameters_are_one_line_errors_before_any_run(api, params_file, capsys):
    upload(api, "v1")
    capsys.readouterr()
    params_file.write_text(yaml.safe_dump({**PARAMS, "sft_confg": {}}))
    assert run(api, params_file) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "sft_confg is not a parameter of alignpipe-dpo" in err and "sft_config" in err
    params_file.write_text(yaml.safe_dump({"sft_inputs": ["a"]}))
    assert run(api, params_file) == 2
    assert "needs preference_inputs" in capsys.readouterr().err
    assert not api.calls("POST", "/runs")


def test_errors_name_the_fix(api, params_file, monkeypatch, capsys):
    assert run(api, params_file) == 2  # nothing uploaded yet
    assert "no pipeline alignpipe-dpo on the server; upload it first" in capsys.readouterr().err
    assert main(["upload", "dpo", "--version", "v1"]) == 2
    assert "pass --host URL or set KFP_HOST" in capsys.readouterr().err
    api.stop()  # nothing listens on its port now
    assert main(["upload", "dpo", "--host", api.url, "--version", "v1"]) == 2
    assert "cannot reach the KFP API" in capsys.readouterr().err


def test_the_default_version_is_the_git_sha_marked_when_dirty(tmp_path):
    def git(*args):
        return subprocess.run(
            ["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.txt").write_text("one")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    sha = git("rev-parse", "--short=12", "HEAD")
    assert kfp_client.git_version(tmp_path) == sha
    (tmp_path / "a.txt").write_text("two")
    assert kfp_client.git_version(tmp_path).startswith(f"{sha}-dirty-")
