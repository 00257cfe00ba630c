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
    """
    from alignpipe.runner import run_stage

    start = base_model.metadata.get("reference") or base_model.path
    result = run_stage(
        "sft",
        data.path,
        model.path,
        overrides={**(config or {}), "model": start},
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
    )
    for key, value in result.metrics.items():
        metrics.log_metric(key, value)
