"""Checkpoints kept in the artifact store, so that a retried pod with an empty output resumes.

The store is a real SeaweedFS (``s3_env``) or a local folder. A "new pod" is the same run
started again after its output folder was deleted: all it has is ``training.checkpoint_uri``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from kfp.dsl import Dataset, Metrics, Model
from safetensors.torch import load_file

from alignpipe import dpo, ingest, ppo, prep, reward_model, sft, storage, synthetic
from alignpipe.config import load_config
from alignpipe.errors import ConfigError, StorageError
from alignpipe.tracking import NullTracker
from alignpipe.training import (
    UPLOAD_MARKER,
    CheckpointStore,
    TrainingOptions,
    resume_checkpoint,
    run_checkpoint_uri,
)

KILL_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Prep'd conversations (``sft``) and ingested pairs (``prefs``) of the synthetic task."""
    root = tmp_path_factory.mktemp("sync-task")
    options = synthetic.SyntheticTaskOptions(num_sft=300, num_prompts=10, num_pairs=120)
    files = synthetic.write_task(options, root / "task")
    prep.run(prep.PrepConfig(), [str(files["sft"])], str(root / "sft"))
    ingest.run(ingest.IngestConfig(), [str(files["votes"])], str(root / "prefs"))
    return {"sft": str(root / "sft"), "prefs": str(root / "prefs")}


@pytest.fixture(params=["s3", "folder"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store in a fresh SeaweedFS bucket, or in a local folder."""
    if request.param == "s3":
        return f"{request.getfixturevalue('s3_env')}/runs/run-1/sft"
    return str(tmp_path / "store")


def fake_checkpoint(root: Path, name: str) -> Path:
    """A checkpoint folder with a weights file and a nested state file that name it."""
    folder = root / name
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(os.urandom(4096))
    (folder / "sub" / "state.json").write_text(json.dumps({"name": name}), encoding="utf-8")
    (folder / "trainer_state.json").write_text("{}", encoding="utf-8")
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def leftovers(output: Path) -> list[str]:
    """What a failed download left in the output's checkpoints folder."""
    folder = output / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def stored_names(uri: str) -> set[str]:
    return {path.split("/")[0] for path in storage.list_relative(uri)}


# ---------------------------------------------------------------------------------------------
# the store


@pytest.mark.integration
def test_store_keeps_the_newest_complete_copies_and_never_takes_an_incomplete_one(
    store_uri: str, tmp_path: Path
) -> None:
    local = tmp_path / "pod-1" / "checkpoints"
    store = CheckpointStore(store_uri, keep=2)
    for step in (10, 20, 30):
        store.upload(fake_checkpoint(local, f"checkpoint-{step}"))
    # pruned to the limit, marker written with the list of files
    assert store.complete() == [(20, "checkpoint-20"), (30, "checkpoint-30")]
    assert stored_names(store_uri) == {"checkpoint-20", "checkpoint-30"}
    marker = json.loads(storage.read_text(f"{store_uri}/checkpoint-30/{UPLOAD_MARKER}"))
    sizes = {name: len(data) for name, data in tree(local / "checkpoint-30").items()}
    assert marker == {"step": 30, "files": sizes}
    assert sorted(sizes) == ["sub/state.json", "trainer_state.json", "weights.bin"]

    # an upload cut short: the files are there, the marker is not
    storage.upload(fake_checkpoint(local, "checkpoint-40"), f"{store_uri}/checkpoint-40")
    assert store.complete()[-1] == (30, "checkpoint-30")

    # a new pod: empty output, resumes from the newest complete copy, byte for byte
    output = tmp_path / "pod-2"
    options = TrainingOptions(checkpoint_uri=store_uri, save_total_limit=2)
    resumed = resume_checkpoint(output, options)
    assert resumed == str(output / "checkpoints" / "checkpoint-30")
    assert tree(Path(resumed)) == tree(local / "checkpoint-30")
    assert [p.name for p in (output / "checkpoints").iterdir()] == ["checkpoint-30"]

    # the next upload prunes the remains of the cut-short one (older than itself) too
    store.upload(fake_checkpoint(local, "checkpoint-50"))
    assert stored_names(store_uri) == {"checkpoint-30", "checkpoint-50"}


@pytest.mark.integration
def test_a_local_checkpoint_wins_and_no_store_means_no_download(tmp_path: Path, s3_env: str):
    uri = f"{s3_env}/ckpt"
    CheckpointStore(uri, keep=2).upload(fake_checkpoint(tmp_path / "elsewhere", "checkpoint-30"))
    output = tmp_path / "out"
    fake_checkpoint(output / "checkpoints", "checkpoint-10")
    options = TrainingOptions(checkpoint_uri=uri)
    assert resume_checkpoint(output, options) == str(output / "checkpoints" / "checkpoint-10")
    assert resume_checkpoint(tmp_path / "empty", TrainingOptions()) is None
    assert not (tmp_path / "empty" / "checkpoints").exists()


@pytest.mark.integration
def test_a_copy_missing_a_listed_file_fails_the_download(s3_env: str, s3_raw, tmp_path: Path):
    uri = f"{s3_env}/ckpt"
    CheckpointStore(uri, keep=2).upload(fake_checkpoint(tmp_path / "pod", "checkpoint-10"))
    bucket = uri.removeprefix("s3://").split("/")[0]
    s3_raw.delete_object(Bucket=bucket, Key="ckpt/checkpoint-10/weights.bin")
    output = tmp_path / "new-pod"
    with pytest.raises(StorageError, match=r"checkpoint-10/weights\.bin"):
        resume_checkpoint(output, TrainingOptions(checkpoint_uri=uri))
    # nothing is left behind, least of all something that looks like a checkpoint
    assert leftovers(output) == []


def test_a_marker_listing_a_file_outside_its_checkpoint_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    CheckpointStore(str(store), keep=2).upload(fake_checkpoint(tmp_path / "pod", "checkpoint-1"))
    marker = {"step": 1, "files": {"../../pod/checkpoint-1/weights.bin": 4096}}
    storage.write_text(str(store / "checkpoint-1" / UPLOAD_MARKER), json.dumps(marker))
    output = tmp_path / "new-pod"
    with pytest.raises(StorageError, match="outside the checkpoint"):
        resume_checkpoint(output, TrainingOptions(checkpoint_uri=str(store)))
    assert leftovers(output) == []


@pytest.mark.integration
def test_a_missing_bucket_fails_before_training(s3_env: str, tmp_path: Path) -> None:
    options = TrainingOptions(checkpoint_uri="s3://no-such-bucket-alignpipe/ckpt")
    with pytest.raises(StorageError, match="does not exist"):
        resume_checkpoint(tmp_path, options)


@pytest.mark.parametrize(
    ("uri", "fix"),
    [("gs://bucket/ckpt", "s3://bucket/prefix or a local folder"), ("  ", "leave it unset"),
     ("s3://", "names no bucket")],
)  # fmt: skip
def test_bad_checkpoint_uri_names_the_fix(uri: str, fix: str) -> None:
    with pytest.raises(ConfigError, match=fix):
        load_config(sft.SftStageConfig, None, {"model": "m", "training.checkpoint_uri": uri})


def test_run_checkpoint_uri_needs_the_run_id() -> None:
    assert run_checkpoint_uri("s3://b/ckpt/", "run-7", "dpo") == "s3://b/ckpt/run-7/dpo"
    with pytest.raises(ConfigError, match="PIPELINE_JOB_ID_PLACEHOLDER"):
        run_checkpoint_uri("s3://b/ckpt", None, "dpo")


# ---------------------------------------------------------------------------------------------
# SFT (a TRL stage) killed in one pod, resumed in the next

SFT_OPTIONS = {
    "peft.method": "none",
    "max_length": 128,
    "training.num_threads": 1,
    "training.precision": "fp32",
    "training.batch_size": 16,
    "training.learning_rate": 3e-3,
    "training.max_steps": 20,
    "training.logging_steps": 5,
    "training.save_steps": 5,
    "training.save_total_limit": 2,
}

STALL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from alignpipe import sft
    from alignpipe.config import load_config
    from alignpipe.tracking import NullTracker

    class StallAtStep15(NullTracker):
        # checkpoint-10 is saved and stored by the log of step 15; checkpoint-15 is not begun
        def log_metrics(self, metrics, step=None):
            if step is not None and step >= 15:
                Path(sys.argv[3]).touch()
                time.sleep(3600)
            super().log_metrics(metrics, step)

    config = load_config(sft.SftStageConfig, None, sys.argv[4:])
    sft.run(config, sys.argv[1], sys.argv[2], tracker=StallAtStep15())
    """
)


def run_until_stalled(command: list[str], stalled: Path, log_file: Path) -> None:
    """Start a stage that stalls at a known step, wait for it, then SIGKILL it (a lost pod)."""
    with log_file.open("wb") as sink:  # a file: a pipe nobody reads fills up and blocks
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while not stalled.exists():
            if process.poll() is not None:
                pytest.fail(f"the run ended early:\n{log_file.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the run did not reach its stall point in time")
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.slow
@pytest.mark.integration
def test_sft_killed_in_one_pod_resumes_from_the_store_in_the_next(
    tiny_tokenizer_dir: Path, task: dict[str, str], s3_env: str, tmp_path: Path
) -> None:
    uri = f"{s3_env}/checkpoints/run-1/sft"
    values = {"model": str(tiny_tokenizer_dir), **SFT_OPTIONS, "training.checkpoint_uri": uri}
    overrides = [f"{key}={value}" for key, value in values.items()]
    out = tmp_path / "out"
    stalled = tmp_path / "stalled"
    command = [sys.executable, "-c", STALL_SCRIPT, task["sft"], str(out), str(stalled), *overrides]
    run_until_stalled(command, stalled, tmp_path / "pod-1.log")
    store = CheckpointStore(uri, keep=2)
    assert store.complete() == [(5, "checkpoint-5"), (10, "checkpoint-10")]

    # the next pod starts with an empty output folder
    shutil.rmtree(out)
    tracker = NullTracker()
    config = load_config(sft.SftStageConfig, None, overrides)
    result = sft.run(config, task["sft"], str(out), tracker=tracker)

    assert result.resumed_from == str(out / "checkpoints" / "checkpoint-10")
    assert result.metrics["resumed_from_step"] == 10
    assert result.metrics["global_step"] == 20
    # only steps 11-20 ran in the new pod: its first training log is at step 15
    assert [step for name, _, step in tracker.metrics if name == "loss"] == [15, 20]
    # the store holds the newest save_total_limit checkpoints, as the output does
    assert store.complete() == [(15, "checkpoint-15"), (20, "checkpoint-20")]
    assert stored_names(uri) == {"checkpoint-15", "checkpoint-20"}
    local = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert local == ["checkpoint-15", "checkpoint-20"]
    # and it ends where a run that was never interrupted ends
    unbroken = load_config(sft.SftStageConfig, None, overrides[:-1])  # no store
    whole = sft.run(unbroken, task["sft"], str(tmp_path / "whole"))
    assert result.metrics["eval_loss"] == pytest.approx(whole.metrics["eval_loss"], rel=1e-4)
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_initial"]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("stage", ["dpo", "reward_model"])
def test_dpo_and_reward_model_store_their_checkpoints_too(
    stage: str, tiny_tokenizer_dir: Path, task: dict[str, str], s3_env: str, tmp_path: Path
) -> None:
    from alignpipe.runner import build_config

    uri = f"{s3_env}/checkpoints/run-1/{stage}"
    overrides = {
        "model": str(tiny_tokenizer_dir),
        "peft.method": "none",
        "max_length": 64,
        "training.max_steps": 2,
        "training.save_steps": 1,
        "training.save_total_limit": 1,
        "training.batch_size": 8,
        "training.num_threads": 1,
        "training.precision": "fp32",
        "training.checkpoint_uri": uri,
    }
    module = dpo if stage == "dpo" else reward_model
    out = tmp_path / "out"
    module.run(build_config(stage, None, overrides), task["prefs"], str(out))
    assert CheckpointStore(uri, keep=1).complete() == [(2, "checkpoint-2")]
    assert stored_names(uri) == {"checkpoint-2"}

    # what a new pod would resume from is the checkpoint this one wrote, byte for byte
    options = TrainingOptions(checkpoint_uri=uri, save_total_limit=1)
    resumed = resume_checkpoint(tmp_path / "new-pod", options)
    assert tree(Path(resumed)) == tree(out / "checkpoints" / "checkpoint-2")


# ---------------------------------------------------------------------------------------------
# PPO (its own loop and save function), lost after iteration 3, resumed in a new pod


class LostAtIteration(NullTracker):
    """Raises at the log of one step: after the checkpoints before it, before its own."""

    def __init__(self, iteration: int) -> None:
        super().__init__()
        self.iteration = iteration

    def log_metrics(self, metrics, step=None):
        if step == self.iteration:
            raise KeyboardInterrupt("the pod is gone")
        super().log_metrics(metrics, step)


def ppo_overrides(model: Path, *extra: str) -> list[str]:
    return [
        f"model={model}",
        "reward=gold",
        "max_new_tokens=8",
        "rollout_batch_size=8",
        "mini_batch_size=4",
        "ppo_epochs=1",
        "eval_prompts=4",
        "training.max_steps=4",
        "training.save_steps=1",
        "training.save_total_limit=2",
        "training.learning_rate=1e-2",
        "training.lr_scheduler=constant",
        "training.logging_steps=1000",
        "training.num_threads=1",
        "training.precision=fp32",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.integration
def test_ppo_lost_mid_run_resumes_from_the_store_and_ends_as_an_unbroken_run(
    tiny_tokenizer_dir: Path, task: dict[str, str], s3_env: str, tmp_path: Path
) -> None:
    uri = f"{s3_env}/checkpoints/run-1/ppo"
    overrides = ppo_overrides(tiny_tokenizer_dir, f"training.checkpoint_uri={uri}")
    config = load_config(ppo.PpoStageConfig, None, overrides)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        ppo.run(config, task["prefs"], str(out), tracker=LostAtIteration(3))
    store = CheckpointStore(uri, keep=2)
    assert store.complete() == [(1, "iter-1"), (2, "iter-2")]

    shutil.rmtree(out)
    tracker = NullTracker()
    result = ppo.run(config, task["prefs"], str(out), tracker=tracker)
    assert result.resumed_from == str(out / "checkpoints" / "iter-2")
    assert result.metrics["resumed_from_iteration"] == 2
    assert result.metrics["iterations"] == 4
    assert sorted({step for name, _, step in tracker.metrics if name == "score"}) == [3, 4]
    assert store.complete() == [(3, "iter-3"), (4, "iter-4")]
    assert stored_names(uri) == {"iter-3", "iter-4"}

    # weights, optimizer, KL controller and RNG states came back through the store
    unbroken = load_config(ppo.PpoStageConfig, None, ppo_overrides(tiny_tokenizer_dir))
    whole = ppo.run(unbroken, task["prefs"], str(tmp_path / "whole"))
    for key in ("reward", "kl_to_reference", "response_length"):
        assert result.metrics[key] == pytest.approx(whole.metrics[key], abs=1e-6), key
    resumed = load_file(Path(result.model_dir) / "model.safetensors")
    for name, value in load_file(Path(whole.model_dir) / "model.safetensors").items():
        torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# the component: a KFP retry of the same run id finds the checkpoints of the failed attempt


def artifact(cls, root: Path, name: str, uri: str | None = None):
    return cls(name=name, uri=uri or str(root / name), metadata={})


@pytest.mark.slow
@pytest.mark.integration
def test_sft_component_retry_resumes_from_the_run_checkpoints(
    tiny_tokenizer_dir: Path,
    task: dict[str, str],
    s3_env: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from components.sft import sft as sft_component

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = artifact(Dataset, tmp_path, "data", task["sft"])
    base = artifact(Model, tmp_path, "base", str(tiny_tokenizer_dir))
    config = {"peft": {"method": "none"}, "max_length": 128, "training": {
        "max_steps": 6, "save_steps": 3, "logging_steps": 1, "batch_size": 8,
        "num_threads": 1}}  # fmt: skip
    root = f"{s3_env}/alignpipe-checkpoints"

    # the first attempt, lost after checkpoint-3: the stage as the component runs it
    stored = run_checkpoint_uri(root, "run-42", "sft")
    first = load_config(
        sft.SftStageConfig,
        None,
        # a copy: dotted overrides write into the nested dicts they are merged with
        {
            **copy.deepcopy(config),
            "model": str(tiny_tokenizer_dir),
            "training.checkpoint_uri": stored,
        },
    )
    with pytest.raises(KeyboardInterrupt):
        sft.run(first, task["sft"], str(tmp_path / "attempt-1"), tracker=LostAtIteration(4))
    assert CheckpointStore(stored, 2).complete() == [(3, "checkpoint-3")]

    # KFP retries the task: same run id, a fresh output folder
    metrics = artifact(Metrics, tmp_path, "metrics")
    sft_component.python_func(
        data=data,
        base_model=base,
        model=artifact(Model, tmp_path, "attempt-2"),
        metrics=metrics,
        config=config,
        checkpoint_root=root,
        kfp_run_id="run-42",
    )
    assert metrics.metadata["resumed_from_step"] == 3
    assert metrics.metadata["global_step"] == 6
    assert CheckpointStore(stored, 2).complete() == [(3, "checkpoint-3"), (6, "checkpoint-6")]

    with pytest.raises(ConfigError, match="kfp_run_id"):
        sft_component.python_func(
            data=data,
            base_model=base,
            model=artifact(Model, tmp_path, "no-run-id"),
            metrics=artifact(Metrics, tmp_path, "m"),
            config=config,
            checkpoint_root=root,
        )
