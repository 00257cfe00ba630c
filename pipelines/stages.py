"""Sub-pipelines the pipelines share: data, SFT, the RLHF branch, and the gate.

Each is a ``@dsl.pipeline`` used as a step of a larger graph, so the KFP UI shows a short story
(data → SFT → alignment → gate) that opens into its tasks.
"""

from typing import NamedTuple, Optional

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Model

from components.base_model import base_model
from components.evaluate import evaluate
from components.ingest import ingest
from components.ppo import ppo
from components.prep import prep
from components.register import register
from components.reward_model import reward_model
from components.sft import sft
from pipelines import resources


class DataOutputs(NamedTuple):
    conversations: Dataset
    pairs: Dataset


class SftOutputs(NamedTuple):
    base_model: Model
    model: Model


class RlhfOutputs(NamedTuple):
    reward_model: Model
    policy: Model
    reward_model_metrics: Metrics
    policy_metrics: Metrics


@dsl.pipeline(name="data", description="Prepare SFT conversations and preference pairs.")
def data_stage(
    sft_inputs: list,
    preference_inputs: list,
    parent_run_id: str,
    accelerator_type: str = resources.ACCELERATOR_TYPE,
    accelerator_count: int = resources.ACCELERATOR_COUNT,
    train_cpu: str = resources.TRAIN_CPU,
    train_memory: str = resources.TRAIN_MEMORY,
    prep_config: Optional[dict] = None,
    ingest_config: Optional[dict] = None,
    tracking_uri: Optional[str] = None,
    s3_secret: str = resources.S3_SECRET,
    mlflow_secret: str = resources.MLFLOW_SECRET,
) -> DataOutputs:
    prepared = prep(
        inputs=sft_inputs,
        config=prep_config,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
    ).set_display_name("data prep")
    pairs = ingest(
        inputs=preference_inputs,
        config=ingest_config,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
    ).set_display_name("preference ingest")
    for task in (prepared, pairs):
        task.set_caching_options(False)  # inputs may be mutable s3:// prefixes
    resources.configure(
        accelerator_type, accelerator_count, train_cpu, train_memory, s3_secret, mlflow_secret
    )
    return DataOutputs(prepared.outputs["data"], pairs.outputs["data"])


@dsl.pipeline(name="sft", description="Name or build the base model, then fine-tune it.")
def sft_stage(
    conversations: Dataset,
    parent_run_id: str,
    base_model_ref: str,
    accelerator_type: str,
    accelerator_count: int,
    train_cpu: str,
    train_memory: str,
    sft_config: Optional[dict] = None,
    tiny_options: Optional[dict] = None,
    tracking_uri: Optional[str] = None,
    s3_secret: str = resources.S3_SECRET,
    mlflow_secret: str = resources.MLFLOW_SECRET,
) -> SftOutputs:
    start = base_model(
        model_ref=base_model_ref, data=conversations, tiny_options=tiny_options
    ).set_display_name("base model")
    tuned = sft(
        data=conversations,
        base_model=start.outputs["model"],
        config=sft_config,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        **resources.checkpointing(dsl.PIPELINE_JOB_ID_PLACEHOLDER),
    ).set_display_name("SFT")
    resources.configure(
        accelerator_type, accelerator_count, train_cpu, train_memory, s3_secret, mlflow_secret
    )
    return SftOutputs(start.outputs["model"], tuned.outputs["model"])


@dsl.pipeline(name="rlhf", description="Train a reward model, then PPO against it.")
def rlhf_stage(
    pairs: Dataset,
    sft_model: Model,
    parent_run_id: str,
    accelerator_type: str,
    accelerator_count: int,
    train_cpu: str,
    train_memory: str,
    reward_model_config: Optional[dict] = None,
    ppo_config: Optional[dict] = None,
    tracking_uri: Optional[str] = None,
    s3_secret: str = resources.S3_SECRET,
    mlflow_secret: str = resources.MLFLOW_SECRET,
) -> RlhfOutputs:
    scorer = reward_model(
        data=pairs,
        sft_model=sft_model,
        config=reward_model_config,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        **resources.checkpointing(dsl.PIPELINE_JOB_ID_PLACEHOLDER),
    ).set_display_name("reward model")
    policy = ppo(
        data=pairs,
        sft_model=sft_model,
        reward_model=scorer.outputs["model"],
        config=ppo_config,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        **resources.checkpointing(dsl.PIPELINE_JOB_ID_PLACEHOLDER),
    ).set_display_name("PPO")
    resources.configure(
        accelerator_type, accelerator_count, train_cpu, train_memory, s3_secret, mlflow_secret
    )
    return RlhfOutputs(
        scorer.outputs["model"],
        policy.outputs["model"],
        scorer.outputs["metrics"],
        policy.outputs["metrics"],
    )


@dsl.pipeline(name="gate", description="Evaluate the policy against SFT; register if it passes.")
def gate_stage(
    policy: Model,
    reference: Model,
    base_model: Model,
    conversations: Dataset,
    pairs: Dataset,
    parent_run_id: str,
    model_name: str,
    gate_metric: str,
    accelerator_type: str,
    accelerator_count: int,
    train_cpu: str,
    train_memory: str,
    eval_config: Optional[dict] = None,
    tracking_uri: Optional[str] = None,
    s3_secret: str = resources.S3_SECRET,
    mlflow_secret: str = resources.MLFLOW_SECRET,
):
    evaluated = evaluate(
        policy=policy,
        reference=reference,
        base_model=base_model,
        data=pairs,
        sft_data=conversations,
        config=eval_config,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
    ).set_display_name("evaluation")
    with dsl.If(evaluated.outputs["Output"] == True, name="gate passed"):  # noqa: E712
        register(
            model=policy,
            evaluation=evaluated.outputs["evaluation"],
            model_name=model_name,
            gate_metric=gate_metric,
            tracking_uri=tracking_uri,
            parent_run_id=parent_run_id,
        ).set_display_name("register")
    resources.configure(
        accelerator_type, accelerator_count, train_cpu, train_memory, s3_secret, mlflow_secret
    )
