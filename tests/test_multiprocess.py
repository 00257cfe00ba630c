"""A stage on several local processes: how many a component starts, and SFT under torchrun.

With ``ALIGNPIPE_PROCESSES=2`` a CPU machine runs two gloo ranks, the same path a pod with two
GPUs takes (one process per GPU).
"""

import json
import logging
from pathlib import Path

import pytest

from alignpipe import prep, synthetic
from alignpipe.errors import ConfigError
from alignpipe.launch import PROCESSES_ENV, local_processes
from alignpipe.runner import run_stage
from alignpipe.tracking import start_pipeline_run


def test_one_process_per_gpu_for_the_data_parallel_stages_only(caplog):
    for stage in ("sft", "dpo", "reward_model", "multitask"):
        assert local_processes(stage, env={}, device_count=4) == 4
    assert local_processes("sft", env={}, device_count=1) == 1
    assert local_processes("sft", env={}, device_count=0) == 1  # CPU pod: in-process

    # the variable overrides the device count, both ways
    assert local_processes("sft", env={PROCESSES_ENV: "2"}, device_count=0) == 2
    assert local_processes("dpo", env={PROCESSES_ENV: "1"}, device_count=8) == 1

    # a torchrun worker never launches again
    assert local_processes("sft", env={"LOCAL_RANK": "0"}, device_count=4) == 1
    assert local_processes("sft", env={"WORLD_SIZE": "4", PROCESSES_ENV: "4"}) == 1

    # ppo and the other single-process stages stay at one, and say why
    with caplog.at_level(logging.INFO, logger="alignpipe.launch"):
        assert local_processes("ppo", env={}, device_count=4) == 1
        assert local_processes("evaluate", env={PROCESSES_ENV: "2"}) == 1
    assert "ppo runs in one process although 4 are available" in caplog.text
    assert "single-process" in caplog.text
    assert "evaluate runs in one process" in caplog.text

    # data stages never count devices (device_count=None would import torch)
    assert local_processes("prep", env={}) == 1

    for bad in ("0", "two", "-1"):
        with pytest.raises(ConfigError, match=PROCESSES_ENV):
            local_processes("sft", env={PROCESSES_ENV: bad}, device_count=0)


SFT = {
    "peft.method": "none",
    "max_length": 128,
    "training.num_threads": 1,
    "training.precision": "fp32",
    "training.batch_size": 8,
    "training.learning_rate": 3e-3,
}


def sft_data(root: Path) -> Path:
    task = synthetic.write_task(
        synthetic.SyntheticTaskOptions(num_sft=200, num_prompts=10, num_pairs=20), root
    )
    prep.run(prep.PrepConfig(), [str(task["sft"])], str(root / "data"))
    return root / "data"


@pytest.mark.slow
def test_sft_runs_on_two_ranks_and_tracks_once(tiny_tokenizer_dir, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    data = sft_data(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_pipeline_run(uri, "multiprocess")
    out = tmp_path / "out"

    monkeypatch.setenv(PROCESSES_ENV, "2")
    result = run_stage(
        "sft",
        str(data),
        str(out),
        overrides={
            **SFT,
            "model": str(tiny_tokenizer_dir),
            "training.max_steps": 10,
            "training.logging_steps": 5,
            "training.save_steps": 10,
        },
        tracking_uri=uri,
        parent_run_id=parent,
    )

    # two ranks trained: the checkpoint holds one RNG state per rank
    checkpoint = out / "checkpoints" / "checkpoint-10"
    assert sorted(p.name for p in checkpoint.glob("rng_state*")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]
    # the result is what rank 0 wrote, and training helped
    assert result.metrics == json.loads((out / "metrics.json").read_text())
    assert Path(result.model_dir) == out / "model"
    assert (out / "model" / "model.safetensors").is_file()
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_initial"]
    assert "peak_rss_mb" not in result.metrics  # the launcher's own would mislead

    # one stage run under the parent, opened by rank 0 alone
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("multiprocess")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(runs) == 2 and len(children) == 1
    [child] = children
    assert child.data.tags["alignpipe.stage"] == "sft"
    assert child.info.status == "FINISHED"
    assert child.data.metrics["eval_loss"] == pytest.approx(result.metrics["eval_loss"])
    assert child.data.metrics["peak_rss_mb"] > 0  # rank 0's own peak


@pytest.mark.slow
@pytest.mark.integration
def test_two_ranks_resume_from_one_download_of_the_stored_checkpoint(
    tiny_tokenizer_dir, tmp_path, monkeypatch, capfd, s3_env
):
    """A retried two-GPU pod: its empty output is filled once, by the node's main process."""
    data = sft_data(tmp_path)
    overrides = {
        **SFT,
        "model": str(tiny_tokenizer_dir),
        "training.lr_scheduler": "constant",
        "training.logging_steps": 5,
        "training.save_steps": 5,
        "training.checkpoint_uri": f"{s3_env}/checkpoints/run-1/sft",
    }
    monkeypatch.setenv(PROCESSES_ENV, "2")
    # the first attempt stored checkpoint-5; its pod (and output folder) is gone
    run_stage(
        "sft", str(data), str(tmp_path / "first"), overrides={**overrides, "training.max_steps": 5}
    )
    capfd.readouterr()

    out = tmp_path / "retry"
    result = run_stage(
        "sft", str(data), str(out), overrides={**overrides, "training.max_steps": 10}
    )

    captured = capfd.readouterr()
    logs = captured.out + captured.err
    assert logs.count("downloaded the checkpoint of step 5") == 1, logs[-3000:]
    assert (result.metrics["resumed_from_step"], result.metrics["global_step"]) == (5, 10)
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-10",
        "checkpoint-5",
    ]
