"""Direct preference optimisation component (TRL DPOTrainer)."""

from typing import Optional

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import gpu_component


@gpu_component
def dpo(
    data: Input[Dataset],
    sft_model: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    config: Optional[dict] = None,
    tracking_uri: Optional[str] = None,
    parent_run_id: Optional[str] = None,
):
    """Align the SFT model on preference pairs with DPO.

    With LoRA (the default) the reference model is the SFT model with the adapter switched off,
    so no second copy of the model is held in memory. Loss types include ``sigmoid`` (DPO) and
    ``ipo``; ``beta`` sets how far the policy may move from the reference.

    Args:
        data: An ingest output folder of preference pairs (train.parquet, eval.parquet).
        sft_model: The SFT stage's output; the policy starts from it and it is the reference.
        model: Output folder: ``model/`` (merged weights by default), ``checkpoints/``,
            ``metrics.json``.
        metrics: Held-out implicit-reward accuracy and margins before and after training.
        config: Options of ``alignpipe.dpo.DpoStageConfig`` (``alignpipe options dpo``), e.g.
            ``{"beta": 0.1, "loss_type": "ipo"}``.
        tracking_uri: MLflow tracking URI; unset = ``$MLFLOW_TRACKING_URI``.
        parent_run_id: MLflow parent run of this pipeline run.
    """
    from alignpipe.runner import run_stage

    result = run_stage(
        "dpo",
        data.path,
        model.path,
        overrides={**(config or {}), "model": sft_model.path},
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
    )
    for key, value in result.metrics.items():
        metrics.log_metric(key, value)
