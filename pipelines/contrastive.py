"""The ``contrastive`` pipeline: data prep → base model → contrastive fine-tuning → evaluation.

The inputs are text pairs (``anchor``/``positive``/``negative`` or STS-style scored pairs) in any
layout prep reads. The contrastive step measures the held-out Spearman correlation and
retrieval accuracy@1/MRR of the untrained and the trained encoder on the same pairs and puts
both on the MLflow parent run, so runs line up in MLflow's comparison view; the evaluation
step shows them side by side in the KFP UI.
"""

from typing import Optional

from kfp import dsl
from kfp.dsl import Dataset, Metrics

from components.base_model import base_model
from components.contrastive import contrastive, contrastive_report
from components.prep import prep
from components.tracking import end_tracking, start_tracking
from pipelines import resources


@dsl.pipeline(name="encoder", description="Name or build the base model, then train an encoder.")
def encoder_stage(
    data: Dataset,
    parent_run_id: str,
    base_model_ref: str,
    accelerator_type: str,
    accelerator_count: int,
    train_cpu: str,
    train_memory: str,
    contrastive_config: Optional[dict] = None,
    tiny_options: Optional[dict] = None,
    tracking_uri: Optional[str] = None,
    s3_secret: str = resources.S3_SECRET,
    mlflow_secret: str = resources.MLFLOW_SECRET,
) -> Metrics:
    # A sub-pipeline, so that the hardware parameters reach the GPU task as this graph's
    # inputs: kfp.local does not resolve pipeline parameters set on a task's resources after
    # the ExitHandler around it has closed, which is where the outer pipeline configures.
    start = base_model(
        model_ref=base_model_ref, data=data, tiny_options=tiny_options
    ).set_display_name("base model")
    trained = contrastive(
        data=data,
        base_model=start.outputs["model"],
        config=contrastive_config,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        **resources.checkpointing(dsl.PIPELINE_JOB_ID_PLACEHOLDER),
    ).set_display_name("contrastive")
    resources.configure(
        accelerator_type, accelerator_count, train_cpu, train_memory, s3_secret, mlflow_secret
    )
    return trained.outputs["metrics"]


@dsl.pipeline(name="alignpipe-contrastive", description=__doc__.splitlines()[0])
def contrastive_pipeline(
    pair_inputs: list,
    base_model_ref: str = "tiny",
    experiment: str = "alignpipe",
    tracking_uri: Optional[str] = None,
    prep_config: Optional[dict] = None,
    contrastive_config: Optional[dict] = None,
    tiny_options: Optional[dict] = None,
    accelerator_type: str = resources.ACCELERATOR_TYPE,
    accelerator_count: int = resources.ACCELERATOR_COUNT,
    train_cpu: str = resources.TRAIN_CPU,
    train_memory: str = resources.TRAIN_MEMORY,
    s3_secret: str = resources.S3_SECRET,
    mlflow_secret: str = resources.MLFLOW_SECRET,
):
    """Train a text encoder on pairs and report how much it gained on held-out pairs."""
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    opened = start_tracking(
        pipeline_name="contrastive",
        kfp_run_id=run_id,
        experiment=experiment,
        tracking_uri=tracking_uri,
    ).set_display_name("start tracking")
    closer = end_tracking(kfp_run_id=run_id, tracking_uri=tracking_uri)
    parent = opened.output
    settings = resources.hardware(
        accelerator_type, accelerator_count, train_cpu, train_memory, s3_secret, mlflow_secret
    )
    with dsl.ExitHandler(closer.set_display_name("end tracking"), name="tracked"):
        pairs = prep(
            inputs=pair_inputs, config=prep_config, tracking_uri=tracking_uri, parent_run_id=parent
        ).set_display_name("data prep")
        pairs.set_caching_options(False)  # inputs may be mutable s3:// prefixes
        trained = encoder_stage(
            data=pairs.outputs["data"],
            parent_run_id=parent,
            base_model_ref=base_model_ref,
            contrastive_config=contrastive_config,
            tiny_options=tiny_options,
            tracking_uri=tracking_uri,
            **settings,
        ).set_display_name("encoder")
        contrastive_report(training=trained.output).set_display_name("evaluation")
    resources.configure(**settings)
