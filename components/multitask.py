"""Multitask components: merge per-task data, train on the mixture, report per-task loss."""

from typing import Optional

from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from components import cpu_component, gpu_component


@cpu_component
def merge_tasks(sources: Input[list[Dataset]], data: Output[Dataset], counts: Output[Metrics]):
    """Concatenate the prep outputs of several task-tagged sources into one data folder.

    Args:
        sources: Prep output folders, each tagged with its task (prep ``config["task"]``).
        data: Output folder: train.parquet and eval.parquet of every task, stats.json.
        counts: Conversations per split and task (``train/<task>``, ``eval/<task>``).
    """
    from alignpipe import multitask

    for key, value in multitask.merge([s.path for s in sources], data.path).items():
        counts.log_metric(key, value)


@gpu_component
def multitask(
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
    """Fine-tune the base model on a weighted mixture of tasks, with eval loss per task.

    Tasks are drawn by ``weights`` or by temperature sampling over their sizes; the held-out
    loss of each task (``eval_loss/<task>``) and of all together is measured before and after
    training, and also goes on the MLflow parent run.

    Args:
        data: Conversations tagged with their task (train.parquet, eval.parquet).
        base_model: The model to start from (a folder, or a reference in its metadata).
        model: Output folder: ``model/``, ``checkpoints/``, ``metrics.json``.
        metrics: Eval loss overall and per task, before and after; mixture weights.
        config: Options of ``alignpipe.multitask.MultitaskStageConfig`` (``alignpipe options
            multitask``), e.g. ``{"weights": {"qa": 2, "chat": 1}, "task_prefix": true}``.
        tracking_uri: MLflow tracking URI; unset = ``$MLFLOW_TRACKING_URI``.
        parent_run_id: MLflow parent run of this pipeline run.
        checkpoint_root: Also keep checkpoints under ``CHECKPOINT_ROOT/KFP_RUN_ID/multitask``
            (an ``s3://`` prefix), so that a retried task, whose output starts empty, resumes
            from the newest of them; unset = checkpoints in the output only.
        kfp_run_id: The KFP run id (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``); needed with
            ``checkpoint_root``, and kept by a retry.
    """
    from alignpipe.runner import run_stage
    from alignpipe.training import run_checkpoint_uri

    start = base_model.metadata.get("reference") or base_model.path
    overrides = {**(config or {}), "model": start}
    if checkpoint_root:
        uri = run_checkpoint_uri(checkpoint_root, kfp_run_id, "multitask")
        overrides["training.checkpoint_uri"] = uri
    result = run_stage(
        "multitask",
        [data.path],
        model.path,
        overrides=overrides,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        metrics_to_parent=True,
    )
    for key, value in result.metrics.items():
        metrics.log_metric(key, value)


@cpu_component
def multitask_report(training: Input[Metrics], report: Output[Markdown], report_html: Output[HTML]):
    """Show the held-out loss of every task before and after multitask training.

    The losses are measured by the multitask stage on each task's eval split, which it never
    trains on; this step lays them out as a table for the KFP UI.

    Args:
        training: The multitask stage's metrics.
        report: The per-task table as Markdown.
        report_html: The same table as HTML.
    """
    import shutil
    import tempfile
    from pathlib import Path

    from alignpipe import multitask

    folder = Path(tempfile.mkdtemp(prefix="multitask-report-"))
    multitask.write_report(training.metadata, folder)
    shutil.copyfile(folder / multitask.REPORT_FILE, report.path)
    shutil.copyfile(folder / "report.html", report_html.path)
