"""Reward model component (TRL RewardTrainer)."""

from typing import Optional

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import gpu_component


@gpu_component
def reward_model(
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
    """Train a reward model on preference pairs: a scalar head on the SFT model (or another).

    Reports held-out pairwise accuracy (chosen scored above rejected) and the mean margin,
    before and after training. The saved model scores text for PPO and for evaluation
    (``alignpipe.reward_model.RewardScorer``).

    Args:
        data: An ingest output folder of preference pairs (train.parquet, eval.parquet).
        sft_model: The model whose weights initialise the reward model's trunk, unless
            ``config`` names another ``model`` (a hub id, s3:// prefix or folder): reward
            models score text with their own tokenizer, so any base with a chat template does.
        model: Output folder: ``model/`` (a sequence classifier with one label),
            ``checkpoints/``, ``metrics.json``.
        metrics: Held-out accuracy and margin before and after training, train loss, tokens.
        config: Options of ``alignpipe.reward_model.RewardModelStageConfig``
            (``alignpipe options reward-model``).
        tracking_uri: MLflow tracking URI; unset = ``$MLFLOW_TRACKING_URI``.
        parent_run_id: MLflow parent run of this pipeline run.
        checkpoint_root: Also keep checkpoints under ``CHECKPOINT_ROOT/KFP_RUN_ID/reward_model`` (an
            ``s3://`` prefix), so that a retried task, whose output starts empty, resumes from
            the newest of them; unset = checkpoints in the output only.
        kfp_run_id: The KFP run id (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``); needed with
            ``checkpoint_root``, and kept by a retry.
    """
    from alignpipe.runner import run_stage
    from alignpipe.training import run_checkpoint_uri

    overrides = {"model": sft_model.path, **(config or {})}
    if checkpoint_root:
        uri = run_checkpoint_uri(checkpoint_root, kfp_run_id, "reward_model")
        overrides["training.checkpoint_uri"] = uri
    result = run_stage(
        "reward_model",
        data.path,
        model.path,
        overrides=overrides,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
    )
    for key, value in result.metrics.items():
        metrics.log_metric(key, value)
