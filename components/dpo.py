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
    checkpoint_root: Optional[str] = None,
    kfp_run_id: Optional[str] = None,
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
        checkpoint_root: Also keep checkpoints under ``CHECKPOINT_ROOT/KFP_RUN_ID/dpo`` (an
            ``s3://`` prefix), so that a retried task, whose output starts empty, resumes from
            the newest of them; unset = checkpoints in the output only.
        kfp_run_id: The KFP run id (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``); needed with
            ``checkpoint_root``, and kept by a retry.
    """
    from alignpipe.runner import run_stage
    from alignpipe.training import run_checkpoint_uri

    overrides = {**(config or {}), "model": sft_model.path}
    if checkpoint_root:
        uri = run_checkpoint_uri(checkpoint_root, kfp_run_id, "dpo")
        overrides["training.checkpoint_uri"] = uri
    result = run_stage(
        "dpo",
        data.path,
        model.path,
        overrides=overrides,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
    )
    for key, value in result.metrics.items():
        metrics.log_metric(key, value)
