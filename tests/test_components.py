"""Components called through ``.python_func`` with real artifacts on tmp_path, no mocks."""

import json

import pytest
from kfp.dsl import Dataset, Metrics, Model

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
