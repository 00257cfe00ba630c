"""The ``compare`` pipeline: one SFT model, then DPO and reward model + PPO side by side.

Both branches start from the same SFT model and preference pairs, are evaluated against the SFT
model on the same prompts with the same scorers, and meet in a report that puts quality (reward,
win rate, KL, length) next to cost (training time, tokens, peak memory). On a cluster the two
branches run in parallel. Both evaluations get the RLHF branch's reward model, so
``scorers: [gold, reward_model]`` in ``eval_config`` scores both policies with it as well.
"""

from typing import Optional

from kfp import dsl

from components.compare import compare_report
from components.dpo import dpo
from components.evaluate import evaluate
from components.tracking import end_tracking, start_tracking
from pipelines import resources
from pipelines.stages import data_stage, rlhf_stage, sft_stage


@dsl.pipeline(name="alignpipe-compare", description=__doc__.splitlines()[0])
def compare_pipeline(
    sft_inputs: list,
    preference_inputs: list,
    base_model_ref: str = "tiny",
    experiment: str = "alignpipe",
    tracking_uri: Optional[str] = None,
    prep_config: Optional[dict] = None,
    ingest_config: Optional[dict] = None,
    sft_config: Optional[dict] = None,
    dpo_config: Optional[dict] = None,
    reward_model_config: Optional[dict] = None,
    ppo_config: Optional[dict] = None,
    eval_config: Optional[dict] = None,
    tiny_options: Optional[dict] = None,
    accelerator_type: str = resources.ACCELERATOR_TYPE,
    accelerator_count: int = resources.ACCELERATOR_COUNT,
    train_cpu: str = resources.TRAIN_CPU,
    train_memory: str = resources.TRAIN_MEMORY,
    s3_secret: str = resources.S3_SECRET,
    mlflow_secret: str = resources.MLFLOW_SECRET,
):
    """Measure DPO against RLHF (reward model + PPO) on the same data and SFT model."""
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    opened = start_tracking(
        pipeline_name="compare", kfp_run_id=run_id, experiment=experiment, tracking_uri=tracking_uri
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
        conversations, pairs = data.outputs["conversations"], data.outputs["pairs"]
        tuned = sft_stage(
            conversations=conversations,
            parent_run_id=parent,
            base_model_ref=base_model_ref,
            sft_config=sft_config,
            tiny_options=tiny_options,
            tracking_uri=tracking_uri,
            **settings,
        ).set_display_name("SFT")

        # the two branches
        direct = dpo(
            data=pairs,
            sft_model=tuned.outputs["model"],
            config=dpo_config,
            tracking_uri=tracking_uri,
            parent_run_id=parent,
            **resources.checkpointing(run_id),
        ).set_display_name("DPO")
        rlhf = rlhf_stage(
            pairs=pairs,
            sft_model=tuned.outputs["model"],
            parent_run_id=parent,
            reward_model_config=reward_model_config,
            ppo_config=ppo_config,
            tracking_uri=tracking_uri,
            **settings,
        ).set_display_name("reward model and PPO")

        # both against SFT, on the same prompts and scorers
        evaluations = {}
        for name, policy in (
            ("dpo", direct.outputs["model"]),
            ("ppo", rlhf.outputs["policy"]),
        ):
            evaluations[name] = evaluate(
                policy=policy,
                reference=tuned.outputs["model"],
                base_model=tuned.outputs["base_model"],
                reward_model=rlhf.outputs["reward_model"],
                data=pairs,
                sft_data=conversations,
                config=eval_config,
                tracking_uri=tracking_uri,
                parent_run_id=parent,
                headline_to_parent=False,
            ).set_display_name(f"evaluate {name.upper()}")
        compare_report(
            dpo_evaluation=evaluations["dpo"].outputs["metrics"],
            ppo_evaluation=evaluations["ppo"].outputs["metrics"],
            dpo_training=direct.outputs["metrics"],
            reward_model_training=rlhf.outputs["reward_model_metrics"],
            ppo_training=rlhf.outputs["policy_metrics"],
            tracking_uri=tracking_uri,
            parent_run_id=parent,
        ).set_display_name("comparison report")
    resources.configure(**settings)
