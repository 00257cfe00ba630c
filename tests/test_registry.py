"""Registering models on a real SQLite-backed MLflow store: versions, tags, aliases, downloads."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from alignpipe import models
from alignpipe.errors import ConfigError, ModelError, TrackingError
from alignpipe.registry import GATE_METRIC_TAG, RUN_TAG, register_model
from alignpipe.tracking import start_pipeline_run


@pytest.fixture
def uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    # MLflow may open a default store in the working folder; keep that inside tmp_path
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"


def _register(model_dir: Path, uri: str, delta: float, **kwargs):
    return register_model(
        str(model_dir),
        tracking_uri=uri,
        name=kwargs.pop("name", "policy"),
        metrics=kwargs.pop("metrics", {"gold_reward_delta": delta, "gold_win_rate": 0.5}),
        gate_metric=kwargs.pop("gate_metric", "gold_reward_delta"),
        **kwargs,
    )


def test_champion_moves_only_to_a_better_version(tiny_tokenizer_dir: Path, uri: str) -> None:
    client = MlflowClient(tracking_uri=uri)

    first = _register(tiny_tokenizer_dir, uri, 0.2)
    assert (first.name, first.version) == ("policy", "1")
    assert first.aliases == ["candidate", "champion"]
    assert (first.previous_champion, first.promoted) == (None, True)

    worse = _register(tiny_tokenizer_dir, uri, 0.1)
    assert (worse.version, worse.aliases) == ("2", ["candidate"])
    assert (worse.previous_champion, worse.promoted) == ("1", False)
    # the SQLite store answers versions as int, a server as str
    assert str(client.get_model_version_by_alias("policy", "champion").version) == "1"
    # candidate moved on: version 1 keeps only the champion alias
    assert client.get_model_version("policy", "1").aliases == ["champion"]

    tie = _register(tiny_tokenizer_dir, uri, 0.2)
    assert (tie.version, tie.aliases, tie.promoted) == ("3", ["candidate"], False)

    better = _register(tiny_tokenizer_dir, uri, 0.3)
    assert (better.version, better.aliases) == ("4", ["candidate", "champion"])
    assert (better.previous_champion, better.promoted) == ("1", True)
    assert client.get_model_version("policy", "1").aliases == []
    assert str(client.get_model_version_by_alias("policy", "champion").version) == "4"


def test_lower_is_better_metric_promotes_the_smaller_value(
    tiny_tokenizer_dir: Path, uri: str
) -> None:
    def register(value: float):
        return _register(
            tiny_tokenizer_dir,
            uri,
            0.0,
            name="ppl",
            metrics={"perplexity_policy": value},
            gate_metric="perplexity_policy",
            higher_is_better=False,
        )

    assert register(10.0).promoted is True
    assert register(12.0).promoted is False
    assert register(8.0).promoted is True


def test_version_holds_the_metrics_and_downloads_as_the_model(
    tiny_tokenizer_dir: Path, uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = start_pipeline_run(uri, "eval")
    metrics = {"gold_reward_delta": 0.25, "kl_policy_reference": 3.5}
    registered = _register(tiny_tokenizer_dir, uri, 0.0, metrics=metrics, run_id=run_id)

    client = MlflowClient(tracking_uri=uri)
    version = client.get_model_version("policy", registered.version)
    assert version.tags == {
        "gold_reward_delta": "0.25",
        "kl_policy_reference": "3.5",
        GATE_METRIC_TAG: "gold_reward_delta",
        RUN_TAG: run_id,
    }
    assert version.run_id == run_id
    assert "model/model.safetensors" in [a.path for a in client.list_artifacts(run_id, "model")]

    # the version's source downloads to the very files, which load as a model
    source = client.get_model_version_download_uri("policy", registered.version)
    local = Path(mlflow.artifacts.download_artifacts(source, dst_path=str(tmp_path / "dl")))
    original = (tiny_tokenizer_dir / "model.safetensors").read_bytes()
    assert (local / "model.safetensors").read_bytes() == original
    assert models.load_causal_lm(str(local)).num_parameters() > 0
    # and a consumer finds it by alias, the way a serving job would
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    by_alias = mlflow.artifacts.download_artifacts(
        "models:/policy@champion", dst_path=str(tmp_path / "alias")
    )
    assert (Path(by_alias) / "model.safetensors").read_bytes() == original


def test_champion_without_the_gate_metric_stays(tiny_tokenizer_dir: Path, uri: str) -> None:
    first = _register(tiny_tokenizer_dir, uri, 0.0, metrics={"a": 1.0}, gate_metric="a")
    second = _register(tiny_tokenizer_dir, uri, 0.0, metrics={"b": 5.0}, gate_metric="b")
    assert first.promoted is True
    assert (second.promoted, second.previous_champion, second.aliases) == (
        False,
        "1",
        ["candidate"],
    )


def test_file_store_is_refused_with_the_fix(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    for store in (str(tmp_path / "mlruns"), (tmp_path / "mlruns").as_uri()):
        with pytest.raises(TrackingError, match=r"needs a database-backed store.*sqlite:///"):
            _register(tiny_tokenizer_dir, store, 0.1)
    assert not (tmp_path / "mlruns").exists()


def test_bad_inputs_are_refused(tiny_tokenizer_dir: Path, uri: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'win_rate' is not among the metrics; pass one of: a, b"):
        _register(
            tiny_tokenizer_dir, uri, 0.0, metrics={"b": 1.0, "a": 2.0}, gate_metric="win_rate"
        )
    with pytest.raises(ConfigError, match="is nan"):
        _register(tiny_tokenizer_dir, uri, float("nan"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"holds no \*\.safetensors model"):
        _register(tmp_path / "empty", uri, 0.1)
    with pytest.raises(TrackingError, match="run 0123456789abcdef does not exist"):
        _register(tiny_tokenizer_dir, uri, 0.1, run_id="0123456789abcdef")
