"""The ``multitask`` pipeline: data prep of each source → multitask SFT → per-task evaluation.

Each source is prepped on its own with its task tag (a ``dsl.ParallelFor`` over the sources,
gathered with ``dsl.Collected``), the tagged folders are merged, and one model is trained on
the weighted mixture. The evaluation is the held-out loss of every task before and after
training, measured by the stage on each task's eval split and reported as a table; it also
goes on the MLflow parent run, so runs line up by task in MLflow's comparison view.
"""

from typing import Optional

from kfp import dsl
from kfp.dsl import Dataset, Metrics

from components.base_model import base_model
from components.multitask import merge_tasks, multitask, multitask_report
from components.prep import prep
from components.tracking import end_tracking, start_tracking
from pipelines import resources


@dsl.pipeline(name="multitask", description="Name or build the base model, then train it.")
def multitask_stage(
    data: Dataset,
    parent_run_id: str,
    base_model_ref: str,
    accelerator_type: str,
    accelerator_count: int,
    train_cpu: str,
    train_memory: str,
    multitask_config: Optional[dict] = None,
    tiny_options: Optional[dict] = None,
    tracking_uri: Optional[str] = None,
    s3_secret: str = resources.S3_SECRET,
    mlflow_secret: str = resources.MLFLOW_SECRET,
) -> Metrics:
    # A sub-pipeline of its own, also because kfp.local's orchestrator for graphs with a
    # ParallelFor does not resolve pipeline parameters in the resource requests of a task
    # nested in an ExitHandler; passed in as this graph's inputs, they resolve.
    start = base_model(
        model_ref=base_model_ref, data=data, tiny_options=tiny_options
    ).set_display_name("base model")
    tuned = multitask(
        data=data,
        base_model=start.outputs["model"],
        config=multitask_config,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        **resources.checkpointing(dsl.PIPELINE_JOB_ID_PLACEHOLDER),
    ).set_display_name("multitask")
    resources.configure(
        accelerator_type, accelerator_count, train_cpu, train_memory, s3_secret, mlflow_secret
    )
    return tuned.outputs["metrics"]


@dsl.pipeline(name="alignpipe-multitask", description=__doc__.splitlines()[0])
def multitask_pipeline(
    sources: list,
    base_model_ref: str = "tiny",
    experiment: str = "alignpipe",
    tracking_uri: Optional[str] = None,
    multitask_config: Optional[dict] = None,
    tiny_options: Optional[dict] = None,
    accelerator_type: str = resources.ACCELERATOR_TYPE,
    accelerator_count: int = resources.ACCELERATOR_COUNT,
    train_cpu: str = resources.TRAIN_CPU,
    train_memory: str = resources.TRAIN_MEMORY,
    s3_secret: str = resources.S3_SECRET,
    mlflow_secret: str = resources.MLFLOW_SECRET,
):
    """Fine-tune one model on several tasks and report the held-out loss of each.

    ``sources`` lists one mapping per source: ``{"inputs": [files or s3:// URIs],
    "prep_config": {"task": "NAME", ...}}``; the task tag is required, the other prep options
    are optional. Several sources may share a task.
    """
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    opened = start_tracking(
        pipeline_name="multitask",
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
        with dsl.ParallelFor(sources, name="sources") as source:
            prepared = prep(
                inputs=source.inputs,
                config=source.prep_config,
                tracking_uri=tracking_uri,
                parent_run_id=parent,
            ).set_display_name("data prep")
            prepared.set_caching_options(False)  # inputs may be mutable s3:// prefixes
        merged = merge_tasks(sources=dsl.Collected(prepared.outputs["data"]))
        merged.set_display_name("merge tasks")
        tuned = multitask_stage(
            data=merged.outputs["data"],
            parent_run_id=parent,
            base_model_ref=base_model_ref,
            multitask_config=multitask_config,
            tiny_options=tiny_options,
            tracking_uri=tracking_uri,
            **settings,
        ).set_display_name("multitask")
        multitask_report(training=tuned.output).set_display_name("evaluation")
    resources.configure(**settings)
