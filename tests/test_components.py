"""Components called through ``.python_func`` with real artifacts on tmp_path, no mocks."""

import json
from pathlib import Path

import pytest
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model

from alignpipe import synthetic
from components.base_model import base_model
from components.ingest import ingest
from components.prep import prep
from components.tracking import end_tracking, start_tracking


class FinalStatus:
    """What KFP hands an exit task: the tracked steps' final state (a plain value object)."""

    def __init__(self, state, error_message=None):
        self.state = state
        self.error_message = error_message


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    options = synthetic.SyntheticTaskOptions(num_sft=120, num_pairs=60)
    return synthetic.write_task(options, tmp_path_factory.mktemp("task"))


def artifact(cls, tmp_path, name):
    return cls(name=name, uri=str(tmp_path / name), metadata={})


def test_prep_component_writes_data_and_counts(tmp_path, task_files):
    data, stats = artifact(Dataset, tmp_path, "data"), artifact(Metrics, tmp_path, "stats")
    prep.python_func(inputs=[str(task_files["sft"])], data=data, stats=stats)
    written = json.loads((tmp_path / "data/stats.json").read_text())
    assert stats.metadata["read"] == 120 == written["read"]
    assert stats.metadata["kept"] + stats.metadata["quarantined"] == 120
    assert data.metadata["format"] == "openai_chat"
    assert (tmp_path / "data/train.parquet").exists()


def test_ingest_component_reports_agreement(tmp_path, task_files):
    data, stats = artifact(Dataset, tmp_path, "pairs"), artifact(Metrics, tmp_path, "stats")
    ingest.python_func(inputs=[str(task_files["votes"])], data=data, stats=stats)
    assert data.metadata["format"] == "votes"
    assert stats.metadata["read"] == stats.metadata["kept"] + stats.metadata["quarantined"]
    assert -1.0 <= stats.metadata["agreement_fleiss_kappa"] <= 1.0


def test_base_model_builds_tiny_or_passes_a_reference(tmp_path, task_files):
    data, stats = artifact(Dataset, tmp_path, "data"), artifact(Metrics, tmp_path, "stats")
    prep.python_func(inputs=[str(task_files["sft"])], data=data, stats=stats)

    tiny = artifact(Model, tmp_path, "tiny")
    base_model.python_func(model_ref="tiny", data=data, model=tiny, tiny_options={"num_layers": 1})
    from alignpipe import models

    model = models.load_causal_lm(str(tmp_path / "tiny"))
    assert model.config.num_hidden_layers == 1
    assert "reference" not in tiny.metadata

    named = artifact(Model, tmp_path, "named")
    base_model.python_func(model_ref="org/some-model", data=data, model=named)
    assert named.metadata["reference"] == "org/some-model"
    assert not (tmp_path / "named").exists()  # nothing copied


def test_tracking_components_open_and_close_the_parent(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_tracking.python_func(
        pipeline_name="dpo", kfp_run_id="kfp-123", experiment="e", tracking_uri=uri
    )
    assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"
    end_tracking.python_func(
        kfp_run_id="kfp-123", status=FinalStatus("FAILED", "Task sft failed."), tracking_uri=uri
    )
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["alignpipe.kfp_run_id"] == "kfp-123"
    assert run.data.tags["alignpipe.error"] == "Task sft failed."


def test_start_tracking_without_uri_logs_nowhere(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert start_tracking.python_func(pipeline_name="dpo", kfp_run_id="k") == ""


# Training, evaluation and registration components, on the synthetic task and a tiny model

FAST_TRAINING = {"max_steps": 12, "batch_size": 16, "learning_rate": 3e-3, "save_steps": 50}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, task_files):
    """Prep and ingest outputs, and a tiny base model, as KFP artifacts."""
    root = tmp_path_factory.mktemp("prepared")
    conversations, pairs = artifact(Dataset, root, "data"), artifact(Dataset, root, "pairs")
    prep.python_func(
        inputs=[str(task_files["sft"])], data=conversations, stats=artifact(Metrics, root, "s1")
    )
    ingest.python_func(
        inputs=[str(task_files["votes"])], data=pairs, stats=artifact(Metrics, root, "s2")
    )
    base = artifact(Model, root, "base")
    base_model.python_func(model_ref="tiny", data=conversations, model=base)
    return {"conversations": conversations, "pairs": pairs, "base": base, "root": root}


@pytest.fixture(scope="module")
def sft_model(prepared):
    from components.sft import sft

    root = prepared["root"]
    model, metrics = artifact(Model, root, "sft"), artifact(Metrics, root, "sft-metrics")
    config = {"peft": {"method": "none"}, "training": FAST_TRAINING}
    sft.python_func(
        data=prepared["conversations"],
        base_model=prepared["base"],
        model=model,
        metrics=metrics,
        config=config,
    )
    return model, metrics


def test_sft_component_trains_and_reports(sft_model):
    model, metrics = sft_model
    assert metrics.metadata["eval_loss"] < metrics.metadata["eval_loss_initial"]
    assert (Path(model.path) / "model" / "model.safetensors").exists()


def test_dpo_component_trains_from_the_sft_output(prepared, sft_model, tmp_path):
    from components.dpo import dpo

    model, metrics = artifact(Model, tmp_path, "dpo"), artifact(Metrics, tmp_path, "m")
    dpo.python_func(
        data=prepared["pairs"],
        sft_model=sft_model[0],
        model=model,
        metrics=metrics,
        config={"training": FAST_TRAINING},
    )
    assert (Path(model.path) / "model" / "model.safetensors").exists()
    assert metrics.metadata["global_step"] == FAST_TRAINING["max_steps"]


def test_evaluate_then_register_components(prepared, sft_model, tmp_path):
    from mlflow import MlflowClient

    from components.evaluate import evaluate
    from components.register import register

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_tracking.python_func(pipeline_name="t", kfp_run_id="r1", tracking_uri=uri)
    outputs = {
        "metrics": artifact(Metrics, tmp_path, "metrics"),
        "report": artifact(Markdown, tmp_path, "report.md"),
        "report_html": artifact(HTML, tmp_path, "report.html"),
        "evaluation": artifact(Artifact, tmp_path, "evaluation"),
    }
    # the SFT model against itself: nothing to gain, so a strict gate must fail
    passed = evaluate.python_func(
        policy=sft_model[0],
        reference=sft_model[0],
        data=prepared["pairs"],
        sft_data=prepared["conversations"],
        config={"num_prompts": 8, "max_new_tokens": 8, "min_improvement": 0.01},
        tracking_uri=uri,
        parent_run_id=parent,
        **outputs,
    )
    assert passed is False
    assert outputs["metrics"].metadata["gold_reward_delta"] == 0.0
    assert "data:image/png;base64," in Path(outputs["report"].path).read_text()
    headline = MlflowClient(uri).get_run(parent).data.metrics
    assert headline["gold_win_rate"] == 0.5  # the headline metrics reach the parent run

    version, champion = register.python_func(
        model=sft_model[0],
        evaluation=outputs["evaluation"],
        model_name="tiny-policy",
        tracking_uri=uri,
        parent_run_id=parent,
    )
    assert (version, champion) == ("1", True)
    aliases = MlflowClient(uri).get_registered_model("tiny-policy").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"candidate": "1", "champion": "1"}
