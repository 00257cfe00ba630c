"""The register step after the gate: a model version in the MLflow Model Registry, and its aliases.

Every registered version gets the alias ``candidate``; ``champion`` moves to it only when there
is no champion yet or the new version beats the champion on the gate metric, so consumers that
load ``models:/<name>@champion`` always get the best model seen so far.
"""

from __future__ import annotations

import logging
import math
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpipe.errors import ConfigError, ModelError, TrackingError
from alignpipe.tracking import (
    backend_error,
    create_run,
    display_uri,
    ensure_experiment,
    mlflow_client,
)

logger = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"
ARTIFACT_PATH = "model"
GATE_METRIC_TAG = "alignpipe.gate_metric"
RUN_TAG = "alignpipe.run_id"


@dataclass
class Registration:
    """The outcome of :func:`register_model`."""

    name: str
    version: str
    aliases: list[str]  # aliases now on this version
    previous_champion: str | None  # the champion version before this registration
    promoted: bool  # whether ``champion`` moved to this version


def register_model(
    model_dir: str,
    *,
    tracking_uri: str,
    name: str,
    metrics: Mapping[str, float],
    gate_metric: str,
    run_id: str | None = None,
    higher_is_better: bool = True,
    experiment: str = "alignpipe",
) -> Registration:
    """Register a saved model as a new version of ``name`` and move its aliases.

    The folder is logged as the artifacts ``model/`` of ``run_id`` (or of a new run in
    ``experiment``), and the version's source is that artifact location, as
    ``mlflow.register_model`` does for a ``runs:/`` URI: the version downloads from where the
    files are, with no run lookup. The metrics become version tags; ``candidate`` moves to the
    new version, and ``champion`` too when there is none yet or the new version beats it on
    ``gate_metric`` (read from the champion's tags; a tie keeps the old champion).

    Args:
        model_dir: A local folder holding the model (safetensors weights, config, tokenizer).
        tracking_uri: An MLflow tracking URI backed by a database: ``sqlite:///path/mlflow.db``,
            a ``postgresql://`` URI, or an ``http(s)://`` server.
        name: The registered model's name; created when missing.
        metrics: The evaluation's metrics; must hold ``gate_metric``.
        gate_metric: The metric that decides whether the champion moves.
        run_id: The run to attach the model to (e.g. the evaluation's); a new run when None.
        higher_is_better: Whether a larger ``gate_metric`` is better.
        experiment: Experiment of the new run when ``run_id`` is None.

    Returns:
        The version, the aliases on it, the previous champion and whether it was promoted.

    Raises:
        ConfigError: ``gate_metric`` is not in ``metrics`` or is not finite.
        ModelError: ``model_dir`` is not a folder holding safetensors weights.
        TrackingError: The store is a file store (the registry needs a database), or MLflow
            refused a request.
    """
    _require_database_store(tracking_uri)
    if gate_metric not in metrics:
        raise ConfigError(
            f"gate_metric {gate_metric!r} is not among the metrics; pass one of: "
            f"{', '.join(sorted(metrics))}"
        )
    score = float(metrics[gate_metric])
    if not math.isfinite(score):
        raise ConfigError(f"gate_metric {gate_metric} is {score}; a model needs a finite score")
    folder = Path(model_dir)
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        raise ModelError(
            f"{model_dir} holds no *.safetensors model; pass the model/ folder a training "
            "stage wrote"
        )
    client = mlflow_client(tracking_uri)

    with _mlflow_errors(tracking_uri):
        # log the files and make a version from them
        run_id = run_id or _new_run(client, tracking_uri, experiment, name)
        source = _artifact_root(client, tracking_uri, run_id) + f"/{ARTIFACT_PATH}"
        client.log_artifacts(run_id, str(folder), ARTIFACT_PATH)
        _ensure_registered_model(client, name)
        tags = {k: repr(float(v)) for k, v in metrics.items()}
        tags |= {GATE_METRIC_TAG: gate_metric, RUN_TAG: run_id}
        version = str(client.create_model_version(name, source, run_id=run_id, tags=tags).version)

        # candidate always; champion only when it wins
        client.set_registered_model_alias(name, CANDIDATE, version)
        champion = _champion(client, name)
        previous = str(champion.version) if champion is not None else None
        promoted = champion is None or _beats(score, champion, gate_metric, higher_is_better)
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, version)
        aliases = sorted(client.get_model_version(name, version).aliases)

    logger.info(
        "registered %s version %s (%s = %.4g); champion %s",
        name,
        version,
        gate_metric,
        score,
        f"moved from {previous}" if promoted and previous else "set" if promoted else "stays",
    )
    return Registration(name, version, aliases, previous, promoted)


def _require_database_store(tracking_uri: str) -> None:
    scheme = urllib.parse.urlparse(tracking_uri).scheme
    # a one-letter scheme is a Windows drive letter: a path, so a file store too
    if len(scheme) <= 1 or scheme == "file":
        raise TrackingError(
            f"the MLflow Model Registry needs a database-backed store, and "
            f"{display_uri(tracking_uri)} is a file store; use sqlite:///path/mlflow.db or an "
            "MLflow server (http://host:port)"
        )


def _new_run(client: Any, tracking_uri: str, experiment: str, name: str) -> str:
    experiment_id = ensure_experiment(client, tracking_uri, experiment)
    run = create_run(client, tracking_uri, experiment_id, f"register-{name}", {})
    # The run only carries the files; it is complete as soon as it exists.
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _artifact_root(client: Any, tracking_uri: str, run_id: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.artifact_uri.rstrip("/")
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise TrackingError(
                f"run {run_id} does not exist in MLflow at {display_uri(tracking_uri)}; pass "
                "the evaluation's run id, or none to register under a new run"
            ) from None
        raise


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        # another gate created it between our lookup and our create
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _champion(client: Any, name: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        # mlflow 3.17 answers a missing alias with INVALID_PARAMETER_VALUE, not a 404
        if err.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            return None
        raise


def _beats(score: float, champion: Any, gate_metric: str, higher_is_better: bool) -> bool:
    held = champion.tags.get(gate_metric)
    try:
        best = float(held) if held is not None else math.nan
    except ValueError:
        best = math.nan
    if math.isnan(best):
        # Nothing to compare with: the champion was registered by hand or on another metric.
        # Leaving it in place is the safe choice; say how to change it on purpose.
        logger.warning(
            "champion version %s has no %s tag to compare with; it stays champion (move the "
            "alias by hand with MlflowClient.set_registered_model_alias to replace it)",
            champion.version,
            gate_metric,
        )
        return False
    return score > best if higher_is_better else score < best


@contextmanager
def _mlflow_errors(tracking_uri: str) -> Iterator[None]:
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as err:
        raise backend_error(tracking_uri, err) from None


__all__ = ["CANDIDATE", "CHAMPION", "Registration", "register_model"]
