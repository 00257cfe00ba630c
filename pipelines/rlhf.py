"""The ``rlhf`` pipeline: data prep → SFT → ingest → reward model → PPO → evaluation → register.

The same tracking, data, SFT and gate steps as ``dpo``; the alignment step is a reward model
trained on the preference pairs and PPO against it.
"""

from typing import Optional

from kfp import dsl

from components.tracking import end_tracking, start_tracking
from pipelines import resources
from pipelines.stages import data_stage, gate_stage, rlhf_stage, sft_stage


@dsl.pipeline(name="alignpipe-rlhf", description=__doc__.splitlines()[0])
def rlhf_pipeline(
    sft_inputs: list,
    preference_inputs: list,
    base_model_ref: str = "tiny",
    model_name: str = "alignpipe-rlhf",
    experiment: str = "alignpipe",
    tracking_uri: Optional[str] = None,
    prep_config: Optional[dict] = None,
    ingest_config: Optional[dict] = None,
    sft_config: Optional[dict] = None,
    reward_model_config: Optional[dict] = None,
    ppo_config: Optional[dict] = None,
    eval_config: Optional[dict] = None,
    tiny_options: Optional[dict] = None,
    gate_metric: str = "gold_reward_delta",
    accelerator_type: str = resources.ACCELERATOR_TYPE,
    accelerator_count: int = resources.ACCELERATOR_COUNT,
    train_cpu: str = resources.TRAIN_CPU,
    train_memory: str = resources.TRAIN_MEMORY,
    s3_secret: str = resources.S3_SECRET,
    mlflow_secret: str = resources.MLFLOW_SECRET,
):
    """Align a base model with a reward model and PPO; register it when it beats SFT."""
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    opened = start_tracking(
        pipeline_name="rlhf", kfp_run_id=run_id, experiment=experiment, tracking_uri=tracking_uri
    ).set_display_name("start tracking")
    closer = end_tracking(kfp_run_id=run_id, tracking_uri=tracking_uri)
    parent = opened.output
    settings = resources.hardware(
        accelerator_type, accelerator_count, train_cpu, train_memory, s3_secret, mlflow_secret
    )
    with dsl.ExitHandler(closer.set_display_name("end tracking"), name="tracked"):
        data = data_stage(
            sft_inputs=sft_inputs,
            preference_inputs=preference_inputs,
            parent_run_id=parent,
            prep_config=prep_config,
            ingest_config=ingest_config,
            tracking_uri=tracking_uri,
            **settings,
        ).set_display_name("data")
        tuned = sft_stage(
            conversations=data.outputs["conversations"],
            parent_run_id=parent,
            base_model_ref=base_model_ref,
            sft_config=sft_config,
            tiny_options=tiny_options,
            tracking_uri=tracking_uri,
            **settings,
        ).set_display_name("SFT")
        aligned = rlhf_stage(
            pairs=data.outputs["pairs"],
            sft_model=tuned.outputs["model"],
            parent_run_id=parent,
            reward_model_config=reward_model_config,
            ppo_config=ppo_config,
            tracking_uri=tracking_uri,
            **settings,
        ).set_display_name("reward model and PPO")
        gate_stage(
            policy=aligned.outputs["policy"],
            reference=tuned.outputs["model"],
            base_model=tuned.outputs["base_model"],
            conversations=data.outputs["conversations"],
            pairs=data.outputs["pairs"],
            parent_run_id=parent,
            model_name=model_name,
            gate_metric=gate_metric,
            eval_config=eval_config,
            tracking_uri=tracking_uri,
            **settings,
        ).set_display_name("gate")
    resources.configure(**settings)
