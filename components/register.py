"""Register component: put a model that passed the gate in the MLflow Model Registry."""

from typing import NamedTuple, Optional

from kfp.dsl import Artifact, Input, Model

from components import cpu_component


@cpu_component
def register(
    model: Input[Model],
    evaluation: Input[Artifact],
    model_name: str,
    gate_metric: str = "gold_reward_delta",
    tracking_uri: Optional[str] = None,
    parent_run_id: Optional[str] = None,
) -> NamedTuple("Registration", [("version", str), ("champion", bool)]):
    """Register the model as a new version with alias ``candidate``; promote it to ``champion``
    only when it beats the current champion on the gate metric.

    Args:
        model: The model that passed the gate (a training stage's output folder).
        evaluation: The evaluation's output folder (its metrics.json is stored with the version).
        model_name: Registered model name in MLflow.
        gate_metric: Metric that decides promotion (higher is better).
        tracking_uri: MLflow tracking URI (a database-backed store or a server); unset =
            ``$MLFLOW_TRACKING_URI``.
        parent_run_id: MLflow parent run; the model's files are logged under it.

    Returns:
        version: The new model version.
        champion: Whether it became the champion.
    """
    import json
    from pathlib import Path

    from alignpipe import models, registry, tracking

    metrics = json.loads((Path(evaluation.path) / "metrics.json").read_text())
    result = registry.register_model(
        models.resolve_model(model.path),
        tracking_uri=tracking.require_tracking_uri(tracking_uri),
        name=model_name,
        metrics=metrics,
        gate_metric=gate_metric,
        run_id=parent_run_id or None,
    )
    return (str(result.version), result.promoted)
