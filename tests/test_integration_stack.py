"""The ``dpo`` pipeline against the real local stack, through a restart of S3 and of MLflow.

The fixture starts the stack with the code behind ``make stack-up``: PostgreSQL, SeaweedFS S3
with generated credentials, and an MLflow server that keeps runs in PostgreSQL and proxies
artifacts to a bucket. The pipeline runs under kfp.local with no S3 credentials at all: its
stages reach the bucket only through MLflow. While it runs, a disruptor thread

- stops SeaweedFS as soon as the pipeline's parent run exists, keeps it down until an artifact
  upload has failed against it, and starts it again on the same ports and data;
- restarts the MLflow server once SFT has logged its first training step.

Delivery is then checked over plain HTTP against MLflow's REST API and with boto3 against the
bucket: every stage's child run finished with every metric the stage reported to KFP and every
training step, and every artifact the stages wrote is listed by MLflow and stored in S3. MLflow's
client retries a failed request for about four minutes with backoff, so outages of seconds must
lose nothing; a longer one fails the stage with a TrackingError, and KFP's retry resumes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import stack
from alignpipe import synthetic
from alignpipe.tracking import NullTracker
from pipelines.__main__ import run_local
from stack.__main__ import main as stack_cli

pytestmark = pytest.mark.integration

EXPERIMENT = "stack-integration"
MODEL_NAME = "tiny-stack"
STAGES = ("prep", "ingest", "sft", "dpo", "evaluate")
# SFT runs long enough (seconds, not one) that the MLflow restart, which begins once its first
# loss is logged, always lands inside it: 20 steps once ended 0.1 s before the restart began
SFT_STEPS, DPO_STEPS, LOGGING_STEPS = 400, 10, 5
# how long the disruptor waits for each moment it acts on
WAIT_S = 300.0
# the access-log line of an artifact upload that the server answered with an error
FAILED_UPLOAD = re.compile(r'"PUT /api/2\.0/mlflow-artifacts/artifacts/(\S+) HTTP/1\.1" 5\d\d')


def training(max_steps: int) -> dict[str, Any]:
    return {
        "max_steps": max_steps,
        "logging_steps": LOGGING_STEPS,
        "save_steps": max_steps,
        "batch_size": 16,
        "learning_rate": 3e-3,
    }


# The smallest run that still passes through every stage, the gate and the registration
# (min_improvement is out of reach of any model: quality is tests/test_pipeline_local.py's job).
ARGUMENTS: dict[str, Any] = {
    "base_model_ref": "tiny",
    "tiny_options": {"vocab_size": 512, "hidden_size": 32, "num_layers": 1},
    "prep_config": {"eval_fraction": 0.1},
    "ingest_config": {"eval_fraction": 0.1},
    "sft_config": {"peft": {"method": "none"}, "training": training(SFT_STEPS)},
    "dpo_config": {"peft": {"method": "none"}, "training": training(DPO_STEPS)},
    "eval_config": {
        "num_prompts": 8,
        "samples_per_prompt": 1,
        "max_new_tokens": 8,
        "min_improvement": -1000.0,
    },
    "experiment": EXPERIMENT,
    "model_name": MODEL_NAME,
}


# -- MLflow over plain HTTP ----------------------------------------------------------------------


def rest(
    uri: str, endpoint: str, body: dict[str, Any] | None = None, /, **query: Any
) -> dict[str, Any]:
    """One MLflow REST call: POST ``body`` as JSON, or GET with ``query``."""
    url = f"{uri}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


def tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def search_runs(uri: str) -> list[dict[str, Any]]:
    """Every run of the experiment; none while the experiment does not exist yet."""
    try:
        experiment = rest(uri, "experiments/get-by-name", experiment_name=EXPERIMENT)
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return []
        raise
    body = {"experiment_ids": [experiment["experiment"]["experiment_id"]], "max_results": 1000}
    return rest(uri, "runs/search", body).get("runs", [])


def run_of(runs: list[dict[str, Any]], stage: str) -> dict[str, Any] | None:
    found = [r for r in runs if tags(r).get("alignpipe.stage") == stage]
    return found[0] if found else None


def list_artifacts(uri: str, run_id: str, path: str = "") -> dict[str, int]:
    """Every artifact file of a run (recursively) with its size, as MLflow lists them."""
    query = {"run_id": run_id} | ({"path": path} if path else {})
    files = {}
    for entry in rest(uri, "artifacts/list", **query).get("files", []):
        if entry["is_dir"]:
            files |= list_artifacts(uri, run_id, entry["path"])
        else:
            files[entry["path"]] = int(entry["file_size"])
    return files


# -- the disruptor -------------------------------------------------------------------------------


@dataclass
class Outage:
    """One server taken down mid-run: when (epoch seconds) and what it disturbed."""

    service: str
    down_at: float
    up_at: float
    failed_uploads: list[str] = field(default_factory=list)


class Disruptor(threading.Thread):
    """Restarts SeaweedFS, then MLflow, at chosen moments of a pipeline run."""

    def __init__(self, local: stack.Stack) -> None:
        super().__init__(name="disruptor", daemon=True)
        self.stack = local
        self.finished = threading.Event()  # set when the pipeline is over
        self.outages: list[Outage] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._restart_s3()
            self._restart_mlflow()
        except BaseException as err:  # reported by the test, not lost in a thread
            self.error = err

    def _restart_s3(self) -> None:
        # the parent run exists seconds before the first stage uploads anything
        if not self._wait(lambda: run_of(search_runs(self.stack.mlflow_uri), "pipeline")):
            return
        log = self.stack.log_path("mlflow")
        offset = log.stat().st_size
        down_at = time.time()
        stack.stop_service(self.stack, "seaweedfs")
        uploads: list[str] = []

        def failed_upload() -> bool:
            with log.open(errors="replace") as handle:
                handle.seek(offset)
                uploads[:] = FAILED_UPLOAD.findall(handle.read())
            return bool(uploads)

        self._wait(failed_upload)
        self.stack = stack.start_service(self.stack, "seaweedfs")
        self.outages.append(Outage("seaweedfs", down_at, time.time(), uploads))

    def _restart_mlflow(self) -> None:
        def sft_is_training() -> bool:
            sft = run_of(search_runs(self.stack.mlflow_uri), "sft")
            return sft is not None and any(
                m["key"] == "loss" for m in sft["data"].get("metrics", [])
            )

        if not self._wait(sft_is_training):
            return
        down_at = time.time()
        self.stack = stack.restart_service(self.stack, "mlflow")
        self.outages.append(Outage("mlflow", down_at, time.time()))

    def _wait(self, condition: Callable[[], Any]) -> bool:
        """Poll ``condition`` until it holds (True) or the pipeline ends or time runs out."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and not self.finished.is_set():
            try:
                if condition():
                    return True
            except (urllib.error.URLError, OSError):
                pass  # a server between restarts
            time.sleep(0.5)
        return False


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def local_stack() -> Iterator[stack.Stack]:
    """The stack, started and stopped through the ``stack`` package (as ``make stack-up``)."""
    # Run as root, PostgreSQL runs as the postgres user, which cannot enter pytest's tmp folders
    # (mode 0700); a folder of our own under /tmp is opened for it.
    root = Path(tempfile.mkdtemp(prefix="alignpipe-stack-"))
    root.chmod(0o755)
    try:
        yield stack.up(root)
    finally:
        stack.down(root)
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class PipelineRun:
    stack: stack.Stack
    outputs: Path  # the kfp.local folder of this run: <task>/<output>
    started: float
    ended: float
    outages: list[Outage]
    parent: dict[str, Any]
    children: dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def pipeline_run(local_stack: stack.Stack, tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    root = tmp_path_factory.mktemp("stack-pipeline")
    task = synthetic.write_task(
        synthetic.SyntheticTaskOptions(num_sft=200, num_pairs=200, num_prompts=16), root / "task"
    )
    arguments = ARGUMENTS | {
        "sft_inputs": [str(task["sft"])],
        "preference_inputs": [str(task["votes"])],
        "tracking_uri": local_stack.mlflow_uri,
    }
    disruptor = Disruptor(local_stack)
    with pytest.MonkeyPatch.context() as patch:
        # the stages get no S3 settings: artifacts must travel through the MLflow server
        for name in [n for n in os.environ if n.startswith("AWS_")]:
            patch.delenv(name)
        started = time.time()
        disruptor.start()
        try:
            run_local("dpo", arguments, root / "kfp")
        finally:
            ended = time.time()
            disruptor.finished.set()
            disruptor.join(timeout=2 * stack.control.START_TIMEOUT_S)
    if disruptor.error is not None:
        raise disruptor.error

    runs = search_runs(local_stack.mlflow_uri)
    parents = [r for r in runs if tags(r).get("alignpipe.stage") == "pipeline"]
    assert len(parents) == 1, f"{len(parents)} parent runs"
    [parent] = parents
    children = {
        tags(r)["alignpipe.stage"]: r
        for r in runs
        if tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]
    }
    [outputs] = (root / "kfp").iterdir()  # one pipeline run
    return PipelineRun(local_stack, outputs, started, ended, disruptor.outages, parent, children)


def kfp_metrics(outputs: Path, task: str, name: str) -> dict[str, float]:
    """The metrics a task reported to KFP (its Metrics output), from kfp.local's record."""
    executor = json.loads((outputs / task / "executor_output.json").read_text())
    [artifact] = executor["artifacts"][name]["artifacts"]
    return artifact["metadata"]


def s3_keys(run: PipelineRun, run_id: str) -> dict[str, int]:
    """The objects of a run's artifacts in the bucket: path below the run -> size."""
    prefix = f"artifacts/{run.parent['info']['experiment_id']}/{run_id}/artifacts/"
    pages = run.stack.s3_client().get_paginator("list_objects_v2")
    found = {}
    for page in pages.paginate(Bucket=stack.ARTIFACT_BUCKET, Prefix=prefix):
        found |= {o["Key"][len(prefix) :]: o["Size"] for o in page.get("Contents", [])}
    return found


def download(run: PipelineRun, run_id: str, path: str) -> bytes:
    key = f"artifacts/{run.parent['info']['experiment_id']}/{run_id}/artifacts/{path}"
    body = run.stack.s3_client().get_object(Bucket=stack.ARTIFACT_BUCKET, Key=key)["Body"]
    return body.read()


# -- tests ---------------------------------------------------------------------------------------


def test_both_restarts_happened_in_the_middle_of_the_run(pipeline_run):
    outages = {o.service: o for o in pipeline_run.outages}
    assert set(outages) == {"seaweedfs", "mlflow"}, "a restart did not happen during the run"
    for outage in outages.values():
        assert pipeline_run.started < outage.down_at < outage.up_at < pipeline_run.ended
    # S3 was down while a stage uploaded an artifact (MLflow answered the upload with an error)
    assert outages["seaweedfs"].failed_uploads
    # MLflow was down while SFT was training: its run started before and ended after
    sft = pipeline_run.children["sft"]["info"]
    assert int(sft["start_time"]) / 1000 < outages["mlflow"].down_at
    assert int(sft["end_time"]) / 1000 > outages["mlflow"].up_at


def test_every_stage_finished_under_one_parent(pipeline_run):
    assert pipeline_run.parent["info"]["status"] == "FINISHED"
    assert set(pipeline_run.children) == set(STAGES)
    for stage, run in pipeline_run.children.items():
        assert run["info"]["status"] == "FINISHED", stage


def test_every_metric_a_stage_reported_arrived(pipeline_run):
    outputs = {"prep": "stats", "ingest": "stats", "sft": "metrics", "dpo": "metrics"}
    outputs["evaluate"] = "metrics"
    for stage, name in outputs.items():
        reported = kfp_metrics(pipeline_run.outputs, stage, name)
        logged = {m["key"]: m["value"] for m in pipeline_run.children[stage]["data"]["metrics"]}
        assert reported, stage
        missing = sorted(set(reported) - set(logged))
        assert not missing, f"{stage} lost {missing}"
        for key, value in reported.items():
            assert logged[key] == pytest.approx(value, rel=1e-6), f"{stage} {key}"
    # the evaluation's headline metrics on the parent, for the run-comparison view
    parent = {m["key"] for m in pipeline_run.parent["data"]["metrics"]}
    assert {"gold_reward_delta", "gold_win_rate", "passed"} <= parent


@pytest.mark.parametrize("stage,steps", [("sft", SFT_STEPS), ("dpo", DPO_STEPS)])
def test_every_training_step_arrived(pipeline_run, stage, steps):
    run_id = pipeline_run.children[stage]["info"]["run_id"]
    history = rest(
        pipeline_run.stack.mlflow_uri, "metrics/get-history", run_id=run_id, metric_key="loss"
    )["metrics"]
    # the trainer logs the first step, then every LOGGING_STEPS steps
    expected = {1, *range(LOGGING_STEPS, steps + 1, LOGGING_STEPS)}
    assert {int(m["step"]) for m in history} == expected


def test_every_artifact_is_listed_by_mlflow_and_stored_in_the_bucket(pipeline_run):
    outputs = pipeline_run.outputs
    expected = {
        "prep": {"stats.json"},
        "ingest": {"stats.json"},
        "sft": {"metrics.json"},
        "dpo": {"metrics.json"},
        # report.md, report.html, the plot, samples.jsonl, metrics.json: as the stage wrote them
        "evaluate": {p.name for p in (outputs / "evaluate" / "evaluation").iterdir()},
    }
    uri = pipeline_run.stack.mlflow_uri
    for stage, names in expected.items():
        run_id = pipeline_run.children[stage]["info"]["run_id"]
        listed = list_artifacts(uri, run_id)
        assert set(listed) == names, stage
        assert s3_keys(pipeline_run, run_id) == listed, stage

    # the registered model's files are the DPO model's, on the parent run
    model_dir = outputs / "dpo" / "model" / "model"
    local = {f"model/{p.name}": p.stat().st_size for p in model_dir.iterdir() if p.is_file()}
    parent_id = pipeline_run.parent["info"]["run_id"]
    assert list_artifacts(uri, parent_id) == local
    assert s3_keys(pipeline_run, parent_id) == local


def test_artifacts_downloaded_from_the_bucket_match_what_the_stages_wrote(pipeline_run):
    outputs = pipeline_run.outputs
    children = pipeline_run.children
    # uploaded while S3 was being restarted, and retried; compared with what the tracker's
    # sanitizer (redaction of credential-like keys) makes of the stage's own file
    stats = download(pipeline_run, children["prep"]["info"]["run_id"], "stats.json")
    sanitized = NullTracker()
    sanitized.log_dict(json.loads((outputs / "prep" / "data" / "stats.json").read_text()), "stats")
    assert json.loads(stats) == sanitized.dicts["stats.json"]
    report = download(pipeline_run, children["evaluate"]["info"]["run_id"], "report.md")
    assert report == (outputs / "evaluate" / "evaluation" / "report.md").read_bytes()
    weights = download(
        pipeline_run, pipeline_run.parent["info"]["run_id"], "model/model.safetensors"
    )
    local = (outputs / "dpo" / "model" / "model" / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == hashlib.sha256(local).hexdigest()


def test_the_registered_version_points_at_the_parent_run(pipeline_run):
    found = rest(
        pipeline_run.stack.mlflow_uri,
        "registered-models/alias",
        name=MODEL_NAME,
        alias="candidate",
    )
    assert found["model_version"]["run_id"] == pipeline_run.parent["info"]["run_id"]


# -- the stack's own errors (nothing starts) ------------------------------------------------------


def test_a_taken_port_is_named_before_anything_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(stack.StackError, match=rf"port {port} for mlflow .*--mlflow-port N"):
            stack.up(tmp_path, mlflow_port=port)
    assert stack.status(tmp_path) == dict.fromkeys(stack.SERVICES)


def test_missing_postgresql_is_one_line_naming_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALIGNPIPE_STACK_PG_BIN", str(tmp_path / "nowhere"))
    assert stack_cli(["--dir", str(tmp_path / "state"), "up"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(
        "error: PostgreSQL not found: install it (apt-get install -y postgresql)"
    )
    assert stack.status(tmp_path / "state") == dict.fromkeys(stack.SERVICES)


def test_down_and_status_of_a_stack_that_never_ran(tmp_path, capsys):
    assert stack.down(tmp_path) == []
    assert stack_cli(["--dir", str(tmp_path), "status"]) == 3  # not everything runs
    assert capsys.readouterr().out.splitlines() == [f"{s}: stopped" for s in stack.SERVICES]
