"""The ``dpo`` pipeline: data prep → SFT → preference ingest → DPO → evaluation → register.

Every step logs under one MLflow parent run, opened by the first step (which also checks that
MLflow answers) and closed by an exit handler with the pipeline's final status. The graph is
three sub-pipelines, data, train and gate, so the KFP UI shows the story at a glance. The model
is registered only when the evaluation's gate passes.
"""

from typing import NamedTuple, Optional

from kfp import dsl
from kfp.dsl import Dataset, Model

from components.base_model import base_model
from components.dpo import dpo
from components.evaluate import evaluate
from components.ingest import ingest
from components.prep import prep
from components.register import register
from components.sft import sft
from components.tracking import end_tracking, start_tracking
from pipelines import resources


class DataOutputs(NamedTuple):
    conversations: Dataset
    pairs: Dataset


class TrainOutputs(NamedTuple):
    sft_model: Model
    policy: Model


@dsl.pipeline(name="data", description="Prepare SFT conversations and preference pairs.")
def data_stage(
    sft_inputs: list,
    preference_inputs: list,
    parent_run_id: str,
    prep_config: Optional[dict] = None,
    ingest_config: Optional[dict] = None,
    tracking_uri: Optional[str] = None,
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
    return DataOutputs(prepared.outputs["data"], pairs.outputs["data"])


@dsl.pipeline(name="train", description="Supervised fine-tuning, then DPO on the pairs.")
def train_stage(
    conversations: Dataset,
    pairs: Dataset,
    parent_run_id: str,
    base_model_ref: str,
    accelerator_type: str,
    accelerator_count: int,
    train_cpu: str,
    train_memory: str,
    sft_config: Optional[dict] = None,
    dpo_config: Optional[dict] = None,
    tiny_options: Optional[dict] = None,
    tracking_uri: Optional[str] = None,
) -> TrainOutputs:
    start = base_model(
        model_ref=base_model_ref, data=conversations, tiny_options=tiny_options
    ).set_display_name("base model")
    tuned = sft(
        data=conversations,
        base_model=start.outputs["model"],
        config=sft_config,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
    ).set_display_name("SFT")
    aligned = dpo(
        data=pairs,
        sft_model=tuned.outputs["model"],
        config=dpo_config,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
    ).set_display_name("DPO")
    for task in (tuned, aligned):
        resources.on_gpu(task, accelerator_type, accelerator_count, train_cpu, train_memory)
    return TrainOutputs(tuned.outputs["model"], aligned.outputs["model"])


@dsl.pipeline(name="gate", description="Evaluate the policy against SFT; register if it passes.")
def gate_stage(
    policy: Model,
    reference: Model,
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
):
    evaluated = evaluate(
        policy=policy,
        reference=reference,
        data=pairs,
        sft_data=conversations,
        config=eval_config,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
    ).set_display_name("evaluation")
    resources.on_gpu(evaluated, accelerator_type, accelerator_count, train_cpu, train_memory)
    with dsl.If(evaluated.outputs["Output"] == True, name="gate passed"):  # noqa: E712
        register(
            model=policy,
            evaluation=evaluated.outputs["evaluation"],
            model_name=model_name,
            gate_metric=gate_metric,
            tracking_uri=tracking_uri,
            parent_run_id=parent_run_id,
        ).set_display_name("register")


@dsl.pipeline(name="alignpipe-dpo", description=__doc__.splitlines()[0])
def dpo_pipeline(
    sft_inputs: list,
    preference_inputs: list,
    base_model_ref: str = "tiny",
    model_name: str = "alignpipe-dpo",
    experiment: str = "alignpipe",
    tracking_uri: Optional[str] = None,
    prep_config: Optional[dict] = None,
    ingest_config: Optional[dict] = None,
    sft_config: Optional[dict] = None,
    dpo_config: Optional[dict] = None,
    eval_config: Optional[dict] = None,
    tiny_options: Optional[dict] = None,
    gate_metric: str = "gold_reward_delta",
    accelerator_type: str = resources.ACCELERATOR_TYPE,
    accelerator_count: int = resources.ACCELERATOR_COUNT,
    train_cpu: str = resources.TRAIN_CPU,
    train_memory: str = resources.TRAIN_MEMORY,
):
    """Align a base model with DPO and register it when it beats its SFT starting point."""
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    opened = start_tracking(
        pipeline_name="dpo", kfp_run_id=run_id, experiment=experiment, tracking_uri=tracking_uri
    ).set_display_name("start tracking")
    closer = end_tracking(kfp_run_id=run_id, tracking_uri=tracking_uri)
    hardware = {
        "accelerator_type": accelerator_type,
        "accelerator_count": accelerator_count,
        "train_cpu": train_cpu,
        "train_memory": train_memory,
    }
    with dsl.ExitHandler(closer.set_display_name("end tracking"), name="tracked"):
        data = data_stage(
            sft_inputs=sft_inputs,
            preference_inputs=preference_inputs,
            parent_run_id=opened.output,
            prep_config=prep_config,
            ingest_config=ingest_config,
            tracking_uri=tracking_uri,
        ).set_display_name("data")
        trained = train_stage(
            conversations=data.outputs["conversations"],
            pairs=data.outputs["pairs"],
            parent_run_id=opened.output,
            base_model_ref=base_model_ref,
            sft_config=sft_config,
            dpo_config=dpo_config,
            tiny_options=tiny_options,
            tracking_uri=tracking_uri,
            **hardware,
        ).set_display_name("train")
        gate_stage(
            policy=trained.outputs["policy"],
            reference=trained.outputs["sft_model"],
            conversations=data.outputs["conversations"],
            pairs=data.outputs["pairs"],
            parent_run_id=opened.output,
            model_name=model_name,
            gate_metric=gate_metric,
            eval_config=eval_config,
            tracking_uri=tracking_uri,
            **hardware,
        ).set_display_name("gate")
