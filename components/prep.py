"""Data prep component: raw instruction, chat or pair data to clean train/eval splits."""

from typing import Optional

from kfp.dsl import Dataset, Metrics, Output

from components import cpu_component


@cpu_component
def prep(
    inputs: list,
    data: Output[Dataset],
    stats: Output[Metrics],
    config: Optional[dict] = None,
    tracking_uri: Optional[str] = None,
    parent_run_id: Optional[str] = None,
):
    """Normalize raw data to conversations (or text pairs) and split it into train and eval.

    Reads JSONL, JSON, CSV, TSV, Parquet or saved datasets at local paths or s3:// URIs, in
    any supported layout (auto-detected, or ``config["format"]``). Unusable rows go to
    ``quarantine.jsonl`` with their line and reason; ``read = kept + quarantined``.

    Args:
        inputs: Files or folders to read (s3:// URIs on a cluster).
        data: Output folder: train.parquet, eval.parquet, quarantine.jsonl, stats.json.
        stats: Counts (read, kept, quarantined, train, eval) for the KFP UI.
        config: Options of ``alignpipe.prep.PrepConfig`` (``alignpipe options prep`` lists
            them), e.g. ``{"eval_fraction": 0.1, "max_length": 512}``.
        tracking_uri: MLflow tracking URI; unset = ``$MLFLOW_TRACKING_URI``.
        parent_run_id: MLflow parent run of this pipeline run.
    """
    from alignpipe.runner import run_stage

    result = run_stage(
        "prep",
        inputs,
        data.path,
        overrides=config or {},
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
    )
    for key, value in result.metrics.items():
        stats.log_metric(key, value)
    data.metadata["format"] = result.stats["format"]
