"""Supervised fine-tuning component (TRL SFTTrainer)."""

from typing import Optional

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import gpu_component


@gpu_component
def sft(
    data: Input[Dataset],
    base_model: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    config: Optional[dict] = None,
    tracking_uri: Optional[str] = None,
    parent_run_id: Optional[str] = None,
    checkpoint_root: Optional[str] = None,
    kfp_run_id: Optional[str] = None,
):
    """Fine-tune the base model on conversations, with loss on the assistant turns only.

    LoRA by default (``{"peft": {"method": "none"}}`` for full fine-tuning); checkpoints every
    ``training.save_steps`` steps, and a re-run with the same output resumes from the last one.

    Args:
        data: A prep output folder of conversations (train.parquet, eval.parquet).
        base_model: The model to start from (a folder, or a reference in its metadata).
        model: Output folder: ``model/`` (merged weights by default), ``checkpoints/``,
            ``metrics.json``.
        metrics: Eval loss and perplexity before and after training, train loss, tokens.
        config: Options of ``alignpipe.sft.SftStageConfig`` (``alignpipe options sft``), e.g.
            ``{"training": {"max_steps": 500}, "peft": {"lora": {"r": 16}}}``.
        tracking_uri: MLflow tracking URI; unset = ``$MLFLOW_TRACKING_URI``.
        parent_run_id: MLflow parent run of this pipeline run.
        checkpoint_root: Also keep checkpoints under ``CHECKPOINT_ROOT/KFP_RUN_ID/sft`` (an
            ``s3://`` prefix), so that a retried task, whose output starts empty, resumes from
            the newest of them; unset = checkpoints in the output only.
        kfp_run_id: The KFP run id (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``); needed with
            ``checkpoint_root``, and kept by a retry.
    """
    from alignpipe.runner import run_stage
    from alignpipe.training import run_checkpoint_uri

    start = base_model.metadata.get("reference") or base_model.path
    overrides = {**(config or {}), "model": start}
    if checkpoint_root:
        uri = run_checkpoint_uri(checkpoint_root, kfp_run_id, "sft")
        overrides["training.checkpoint_uri"] = uri
    result = run_stage(
        "sft",
        data.path,
        model.path,
        overrides=overrides,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
    )
    for key, value in result.metrics.items():
        metrics.log_metric(key, value)
