"""Contrastive fine-tuning component: a text encoder trained on pairs (sentence-transformers)."""

from typing import Optional

from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from components import cpu_component, gpu_component


@gpu_component
def contrastive(
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
    """Fine-tune the base model as a text encoder on pairs, and measure it before and after.

    Unscored pairs train with in-batch negatives plus each row's hard negative (preference
    pairs: prompt, chosen, rejected); STS-style scored pairs with a similarity loss. The
    held-out split gives Spearman correlation, retrieval accuracy@1 and MRR of the untrained
    and the trained encoder; they also go on the MLflow parent run.

    Args:
        data: Text pairs (a prep output folder) or preference pairs (an ingest output folder).
        base_model: The model to start from: a sentence-transformers model, or a backbone (a
            causal LM included) that gets a pooling layer.
        model: Output folder: ``model/`` (a sentence-transformers folder, safetensors),
            ``checkpoints/``, ``metrics.json``.
        metrics: Held-out ``eval_spearman``, ``eval_accuracy_at_1`` and ``eval_mrr``, each also
            ``*_initial`` for the untrained encoder; train loss and time.
        config: Options of ``alignpipe.contrastive.ContrastiveStageConfig`` (``alignpipe
            options contrastive``), e.g. ``{"loss": "cached_mnrl", "training": {"batch_size":
            1024}}``.
        tracking_uri: MLflow tracking URI; unset = ``$MLFLOW_TRACKING_URI``.
        parent_run_id: MLflow parent run of this pipeline run.
        checkpoint_root: Also keep checkpoints under ``CHECKPOINT_ROOT/KFP_RUN_ID/contrastive``
            (an ``s3://`` prefix), so that a retried task resumes; unset = output only.
        kfp_run_id: The KFP run id (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``); needed with
            ``checkpoint_root``.
    """
    from alignpipe.runner import run_stage
    from alignpipe.training import run_checkpoint_uri

    start = base_model.metadata.get("reference") or base_model.path
    overrides = {**(config or {}), "model": start}
    if checkpoint_root:
        uri = run_checkpoint_uri(checkpoint_root, kfp_run_id, "contrastive")
        overrides["training.checkpoint_uri"] = uri
    result = run_stage(
        "contrastive",
        data.path,
        model.path,
        overrides=overrides,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        metrics_to_parent=True,
    )
    for key, value in result.metrics.items():
        metrics.log_metric(key, value)


@cpu_component
def contrastive_report(
    training: Input[Metrics], report: Output[Markdown], report_html: Output[HTML]
):
    """Show the held-out Spearman correlation and retrieval accuracy@1/MRR of the untrained
    and the trained encoder side by side.

    The contrastive stage measures both encoders on the eval split, which it never trains on;
    this step lays the numbers out as a table for the KFP UI.

    Args:
        training: The contrastive stage's metrics.
        report: The table as Markdown.
        report_html: The same table as HTML.
    """
    import shutil
    import tempfile

    from alignpipe import contrastive, reports

    markdown = contrastive.write_report(training.metadata, tempfile.mkdtemp(prefix="contrastive-"))
    shutil.copyfile(markdown, report.path)
    shutil.copyfile(markdown.with_name(reports.HTML_FILE), report_html.path)
