"""Tests of the tracking layer on a real MLflow SQLite store (and one real MLflow server)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from alignpipe import __version__
from alignpipe.config import option
from alignpipe.errors import StorageError, TrackingError
from alignpipe.tracking import (
    MAX_PARAM_LENGTH,
    REDACTED,
    TRUNCATED,
    MlflowTracker,
    NullTracker,
    check_connection,
    end_pipeline_run,
    fingerprint_file,
    stage_run,
    start_pipeline_run,
)


@dataclasses.dataclass
class LoraSection:
    r: int = option(8, help="rank")
    alpha: float = option(16.0, help="scale")


@dataclasses.dataclass
class StorageSection:
    endpoint: str = option("http://127.0.0.1:8333", help="S3 endpoint")
    aws_secret_access_key: str = option("", help="S3 secret key")


@dataclasses.dataclass
class StageConfig:
    learning_rate: float = option(1e-4, help="step size")
    lora: LoraSection = option(default_factory=LoraSection, help="adapter")
    storage: StorageSection = option(default_factory=StorageSection, help="artifact store")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One SQLite store for the module: creating its tables costs about a second."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'db' / 'mlflow.db'}", root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(client: MlflowClient, parent_id: str) -> dict[str, object]:
    experiment_id = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    return {run.info.run_name: run for run in runs}


def _run_pipeline(uri: str, experiment: str, workdir: Path) -> str:
    """A parent run with two stages, as a pipeline would log them; returns the parent id."""
    report = workdir / "report.md"
    report.write_text("# eval\nwin rate 0.75\n")
    data = workdir / "train.jsonl"
    data.write_text('{"prompt": "hi"}\n{"prompt": "yo"}\n')

    parent_id = start_pipeline_run(uri, experiment, "pipeline-1", {"kfp.run_id": "kfp-42"})
    with stage_run("sft", tracking_uri=uri, experiment=experiment, parent_run_id=parent_id) as t:
        t.log_params(StageConfig(lora=LoraSection(r=4)))
        t.log_metrics({"loss": 2.5, "lr": 1e-4}, step=1)
        t.log_metrics({"loss": 1.75}, step=2)
        t.log_dataset("train", str(data), fingerprint_file(data), "train", num_rows=2)
        t.log_artifact(report, "reports")
    with stage_run("dpo", tracking_uri=uri, experiment=experiment, parent_run_id=parent_id) as t:
        t.log_params({"beta": 0.1, "loss_type": "sigmoid"})
        t.log_metrics({"rewards/accuracy": 0.5}, step=10)
        t.log_dict({"accuracy": 0.5, "pairs": 2}, "summary")
    end_pipeline_run(uri, parent_id, "FINISHED")
    return parent_id


def test_parent_with_two_stage_runs(
    store: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, root = store
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # artifacts must not land in the current folder

    check_connection(uri)
    parent_id = _run_pipeline(uri, "pipeline-test", tmp_path)

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["kfp.run_id"] == "kfp-42"
    assert parent.data.tags["alignpipe.stage"] == "pipeline"

    children = _children(client, parent_id)
    assert sorted(children) == ["dpo", "sft"]
    sft, dpo = children["sft"], children["dpo"]
    for name, run in children.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.tags["alignpipe.stage"] == name
        assert run.data.tags["alignpipe.version"] == __version__

    # flattened nested dataclass keys, values as strings
    assert sft.data.params == {
        "learning_rate": "0.0001",
        "lora.r": "4",
        "lora.alpha": "16.0",
        "storage.endpoint": "http://127.0.0.1:8333",
        "storage.aws_secret_access_key": "",
    }
    assert dpo.data.params == {"beta": "0.1", "loss_type": "sigmoid"}

    history = client.get_metric_history(sft.info.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (1, 2.5),
        (2, 1.75),
    ]
    assert [(m.step, m.value) for m in client.get_metric_history(sft.info.run_id, "lr")] == [
        (1, 1e-4)
    ]
    assert dpo.data.metrics == {"rewards/accuracy": 0.5}

    # dataset input: digest from the fingerprint, context tag, row count in the profile
    inputs = sft.inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    expected_sha = hashlib.sha256(b'{"prompt": "hi"}\n{"prompt": "yo"}\n').hexdigest()
    assert dataset.name == "train"
    assert dataset.digest == expected_sha[:36]
    assert dataset.source_type == "local"
    assert json.loads(dataset.source) == {"uri": str((tmp_path / "train.jsonl").resolve())}
    assert json.loads(dataset.profile) == {"sha256": expected_sha, "num_rows": 2}
    assert {t.key: t.value for t in inputs[0].tags} == {"mlflow.data.context": "train"}

    # artifacts: listed by MLflow, stored next to the database, nothing in the cwd
    listed = [a.path for a in client.list_artifacts(sft.info.run_id, "reports")]
    assert listed == ["reports/report.md"]
    local = Path(client.download_artifacts(sft.info.run_id, "reports/report.md", str(tmp_path)))
    assert local.read_text() == "# eval\nwin rate 0.75\n"
    assert sft.info.artifact_uri.startswith((root / "db" / "mlartifacts").as_uri())
    summary = client.download_artifacts(dpo.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(summary).read_text()) == {"accuracy": 0.5, "pairs": 2}
    assert list(cwd.iterdir()) == []


def test_stage_that_raises_ends_failed_and_reraises(store: tuple[str, Path]) -> None:
    uri, _ = store
    parent_id = start_pipeline_run(uri, "failing", "pipeline-2", {})
    with (
        pytest.raises(ValueError, match=r"kept share 0\.40 is under the floor"),
        stage_run("data_prep", tracking_uri=uri, experiment="failing", parent_run_id=parent_id),
    ):
        raise ValueError("kept share 0.40 is under the floor 0.9")
    end_pipeline_run(uri, parent_id, "FAILED")

    client = MlflowClient(tracking_uri=uri)
    child = _children(client, parent_id)["data_prep"]
    assert child.info.status == "FAILED"
    assert child.data.tags["alignpipe.error"] == (
        "ValueError: kept share 0.40 is under the floor 0.9"
    )
    assert client.get_run(parent_id).info.status == "FAILED"


def test_end_pipeline_run_rejects_unknown_status(store: tuple[str, Path]) -> None:
    uri, _ = store
    parent_id = start_pipeline_run(uri, "status", None, None)
    with pytest.raises(ValueError, match="FINISHED, FAILED or KILLED"):
        end_pipeline_run(uri, parent_id, "DONE")  # type: ignore[arg-type]
    assert MlflowClient(tracking_uri=uri).get_run(parent_id).info.status == "RUNNING"


def test_stage_under_missing_parent_names_the_fix(store: tuple[str, Path]) -> None:
    uri, _ = store
    with (
        pytest.raises(TrackingError, match="parent run 0123456789abcdef0123456789abcdef does not"),
        stage_run(
            "sft",
            tracking_uri=uri,
            experiment="x",
            parent_run_id="0123456789abcdef0123456789abcdef",
        ),
    ):
        pass


def test_secrets_never_reach_params_or_tags(
    store: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, _ = store
    env_secret = "AKIA-env-secret-9f8e7d"
    config_secret = "config-secret-5c4b3a"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env_secret)
    config = StageConfig(storage=StorageSection(aws_secret_access_key=config_secret))

    with stage_run(
        "ingest",
        tracking_uri=uri,
        experiment="secrets",
        parent_run_id=None,
        tags={"source": f"s3://bucket/data?sig={env_secret}", "api_key": "plain-key-value"},
    ) as tracker:
        tracker.log_params(config)
        tracker.log_params({"note": f"copied {env_secret} by mistake", "hf_token": "hf_abcdef"})
        tracker.set_tags({"endpoint_echo": env_secret})
        tracker.log_dict({"storage": {"aws_secret_access_key": config_secret}}, "config")

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    params, tags = run.data.params, run.data.tags
    assert params["storage.aws_secret_access_key"] == REDACTED
    assert params["hf_token"] == REDACTED
    assert params["note"] == f"copied {REDACTED} by mistake"
    assert tags["source"] == f"s3://bucket/data?sig={REDACTED}"
    assert tags["api_key"] == REDACTED
    assert tags["endpoint_echo"] == REDACTED
    stored = json.dumps(params) + json.dumps(tags)
    assert env_secret not in stored
    assert config_secret not in stored
    document = Path(client.download_artifacts(tracker.run_id, "config.json")).read_text()
    assert json.loads(document) == {"storage": {"aws_secret_access_key": REDACTED}}


def test_short_env_secret_is_scrubbed_only_as_a_whole_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "abc")
    tracker = NullTracker()
    tracker.set_tags({"a": "abc", "b": "abcdef"})
    assert tracker.tags == {"a": REDACTED, "b": "abcdef"}


def test_long_param_is_truncated_with_a_marker(store: tuple[str, Path]) -> None:
    uri, _ = store
    long_value = "x" * (MAX_PARAM_LENGTH + 500)
    with stage_run("sft", tracking_uri=uri, experiment="limits", parent_run_id=None) as tracker:
        tracker.log_params({"chat_template": long_value, "short": "ok"})
    params = MlflowClient(tracking_uri=uri).get_run(tracker.run_id).data.params
    assert len(params["chat_template"]) == MAX_PARAM_LENGTH
    assert params["chat_template"] == "x" * (MAX_PARAM_LENGTH - len(TRUNCATED)) + TRUNCATED
    assert params["short"] == "ok"


def test_non_finite_metrics_are_skipped_with_a_warning(
    store: tuple[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    uri, _ = store
    with (
        caplog.at_level(logging.WARNING, logger="alignpipe.tracking"),
        stage_run("ppo", tracking_uri=uri, experiment="limits", parent_run_id=None) as tracker,
    ):
        tracker.log_metrics({"kl": float("nan"), "reward": 0.25, "ratio": float("inf")}, step=7)
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(tracker.run_id).data.metrics == {"reward": 0.25}
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "reward")] == [
        (7, 0.25)
    ]
    warned = sorted(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert warned == ["metric kl is nan; not logged", "metric ratio is inf; not logged"]


def test_changing_a_logged_param_raises_tracking_error(store: tuple[str, Path]) -> None:
    uri, _ = store
    with stage_run("sft", tracking_uri=uri, experiment="limits", parent_run_id=None) as tracker:
        tracker.log_params({"epochs": 1})
        tracker.log_params({"epochs": 1})  # the same value again is fine
        with pytest.raises(TrackingError, match=r"refused params for run [0-9a-f]{32}"):
            tracker.log_params({"epochs": 2})
    assert MlflowClient(tracking_uri=uri).get_run(tracker.run_id).data.params == {"epochs": "1"}


def test_metrics_over_one_batch_are_all_logged(store: tuple[str, Path]) -> None:
    uri, _ = store
    metrics = {f"task{i}/loss": float(i) for i in range(1205)}  # two log_batch calls
    with stage_run("multitask", tracking_uri=uri, experiment="limits", parent_run_id=None) as t:
        t.log_metrics(metrics, step=3)
    logged = MlflowClient(tracking_uri=uri).get_run(t.run_id).data.metrics
    assert len(logged) == 1205
    assert logged["task1204/loss"] == 1204.0


def test_null_tracker_records_calls(tmp_path: Path) -> None:
    artifact = tmp_path / "quarantine.jsonl"
    artifact.write_text("{}\n")
    with stage_run("sft", tracking_uri=None, experiment="unused", parent_run_id=None) as tracker:
        assert isinstance(tracker, NullTracker)
        assert tracker.run_id is None
        tracker.log_params(StageConfig(storage=StorageSection(aws_secret_access_key="k")))
        tracker.log_metrics({"loss": 3.0, "bad": float("nan")}, step=5)
        tracker.log_metrics({"loss": 2.0}, step=6)
        tracker.log_dataset("eval", "s3://bucket/eval.jsonl", "ab" * 32, "eval", num_rows=10)
        tracker.log_artifact(artifact, "quarantine")
        tracker.log_dict({"kept": 9, "quarantined": 1}, "counts.json")

    assert tracker.params["lora.r"] == "8"
    assert tracker.params["storage.aws_secret_access_key"] == REDACTED
    assert tracker.metrics == [("loss", 3.0, 5), ("loss", 2.0, 6)]
    assert tracker.datasets == [
        {
            "name": "eval",
            "source": "s3://bucket/eval.jsonl",
            "fingerprint": "ab" * 32,
            "context": "eval",
            "num_rows": 10,
        }
    ]
    assert tracker.artifacts == [(str(artifact), "quarantine")]
    assert tracker.dicts == {"counts.json": {"kept": 9, "quarantined": 1}}
    assert tracker.tags == {"alignpipe.stage": "sft", "alignpipe.version": __version__}
    with pytest.raises(StorageError, match=r"missing\.txt does not exist"):
        tracker.log_artifact(tmp_path / "missing.txt")


def test_mlflow_tracker_on_an_existing_run(store: tuple[str, Path]) -> None:
    """The evaluation stage puts headline metrics on the parent run through a plain tracker."""
    uri, _ = store
    parent_id = start_pipeline_run(uri, "headline", "pipeline-3", {})
    MlflowTracker(uri, parent_id).log_metrics({"eval/win_rate": 0.75})
    assert MlflowClient(tracking_uri=uri).get_run(parent_id).data.metrics == {"eval/win_rate": 0.75}


def test_fingerprint_file_and_folder(tmp_path: Path) -> None:
    file = tmp_path / "a.txt"
    file.write_bytes(b"hello\n")
    assert fingerprint_file(file) == hashlib.sha256(b"hello\n").hexdigest()

    first, second = tmp_path / "one", tmp_path / "two"
    for folder, order in ((first, ["b.bin", "sub/c.txt"]), (second, ["sub/c.txt", "b.bin"])):
        for name in order:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(name.encode())
    expected = hashlib.sha256(b"b.bin\0b.bin\0sub/c.txt\0sub/c.txt\0").hexdigest()
    assert fingerprint_file(first) == expected
    assert fingerprint_file(second) == expected  # creation order does not matter

    (second / "b.bin").rename(second / "d.bin")
    assert fingerprint_file(second) != expected  # a rename does
    with pytest.raises(StorageError, match="nope does not exist"):
        fingerprint_file(tmp_path / "nope")


def test_check_connection_fails_fast_on_unreachable_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError) as raised:
        check_connection(uri, timeout=2)
    assert time.monotonic() - started < 5
    assert str(raised.value) == (
        f"cannot reach MLflow at {uri} (start the server or set MLFLOW_TRACKING_URI)"
    )


def test_check_connection_hides_password_in_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    port = _free_port()
    with pytest.raises(TrackingError) as raised:
        check_connection(f"http://bob:hunter22@127.0.0.1:{port}", timeout=2)
    assert "hunter22" not in str(raised.value)
    assert f"http://bob:***@127.0.0.1:{port}" in str(raised.value)


def test_import_is_cheap_and_mlflow_is_quiet(tmp_path: Path) -> None:
    """Importing the module leaves mlflow unloaded; a fresh store logs no INFO chatter."""
    script = (
        "import sys, logging\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "import alignpipe.tracking as t\n"
        "print('mlflow loaded:', 'mlflow' in sys.modules)\n"
        f"t.start_pipeline_run('sqlite:///{tmp_path}/fresh/mlflow.db', 'quiet', 'p', {{}})\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_LOGGING_LEVEL"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout == "mlflow loaded: False\n"
    assert "INFO" not in done.stderr
    assert "Creating initial MLflow database tables" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh"]  # no ./mlruns


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port, stopped after the test."""
    port = _free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (tmp_path / "server.log").open("w")
    # fmt: off
    command = [
        str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
        "--default-artifact-root", str(tmp_path / "artifacts"),
    ]
    # fmt: on
    server = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited: {(tmp_path / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass  # not up yet
            if time.monotonic() > deadline:
                pytest.fail("mlflow server did not answer /health within 60 s")
            time.sleep(0.5)
        yield uri
    finally:
        # The server runs workers as children; stop the process group this test started.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.mark.integration
def test_pipeline_against_a_tracking_server(mlflow_server: str, tmp_path: Path) -> None:
    check_connection(mlflow_server)
    parent_id = _run_pipeline(mlflow_server, "server-test", tmp_path)

    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.get_run(parent_id).info.status == "FINISHED"
    children = _children(client, parent_id)
    assert sorted(children) == ["dpo", "sft"]
    sft = children["sft"]
    assert sft.data.params["lora.r"] == "4"
    history = client.get_metric_history(sft.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.5), (2, 1.75)]
    assert sft.inputs.dataset_inputs[0].dataset.name == "train"
    assert [a.path for a in client.list_artifacts(sft.info.run_id, "reports")] == [
        "reports/report.md"
    ]
    stored = list((tmp_path / "artifacts").rglob("report.md"))
    assert len(stored) == 1
    assert stored[0].read_text() == "# eval\nwin rate 0.75\n"
