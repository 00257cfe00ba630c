"""PPO component: alignpipe's own PPO on transformers and peft."""

from typing import Optional

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import gpu_component


@gpu_component
def ppo(
    data: Input[Dataset],
    sft_model: Input[Model],
    reward_model: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    config: Optional[dict] = None,
    tracking_uri: Optional[str] = None,
    parent_run_id: Optional[str] = None,
    checkpoint_root: Optional[str] = None,
    kfp_run_id: Optional[str] = None,
):
    """Optimise the SFT model against the reward model with PPO and a KL penalty.

    The policy trains a LoRA adapter; the reference is the same model with the adapter off,
    so no second copy is held in memory. Rollouts are generated with the KV cache; rewards
    come from the reward model (or, for the synthetic task, ``{"reward": "gold"}``), with a
    per-token KL penalty against the reference. Checkpoints (adapter, value head, optimizer,
    KL controller, RNG state) make a retried task resume.

    Args:
        data: An ingest output folder; its prompts drive the rollouts.
        sft_model: The starting policy, and the reference.
        reward_model: The reward model stage's output.
        model: Output folder: ``model/`` (merged policy), ``checkpoints/``, ``metrics.json``.
        metrics: Reward and KL to the reference before and after, and training statistics.
        config: Options of ``alignpipe.ppo.PpoStageConfig`` (``alignpipe options ppo``).
        tracking_uri: MLflow tracking URI; unset = ``$MLFLOW_TRACKING_URI``.
        parent_run_id: MLflow parent run of this pipeline run.
        checkpoint_root: Also keep checkpoints under ``CHECKPOINT_ROOT/KFP_RUN_ID/ppo`` (an
            ``s3://`` prefix), so that a retried task, whose output starts empty, resumes from
            the newest of them; unset = checkpoints in the output only.
        kfp_run_id: The KFP run id (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``); needed with
            ``checkpoint_root``, and kept by a retry.
    """
    from alignpipe.runner import run_stage
    from alignpipe.training import run_checkpoint_uri

    overrides = {"model": sft_model.path, "reward_model": reward_model.path}
    if checkpoint_root:
        uri = run_checkpoint_uri(checkpoint_root, kfp_run_id, "ppo")
        overrides["training.checkpoint_uri"] = uri
    result = run_stage(
        "ppo",
        data.path,
        model.path,
        overrides={**(config or {}), **overrides},
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
    )
    for key, value in result.metrics.items():
        metrics.log_metric(key, value)
