"""Preference ingest component: pairs, feedback or annotation exports to preference pairs."""

from typing import Optional

from kfp.dsl import Dataset, Metrics, Output

from components import cpu_component


@cpu_component
def ingest(
    inputs: list,
    data: Output[Dataset],
    stats: Output[Metrics],
    config: Optional[dict] = None,
    tracking_uri: Optional[str] = None,
    parent_run_id: Optional[str] = None,
):
    """Turn preference data into canonical pairs (prompt, chosen, rejected) and split them.

    Takes ready pairs (HH-RLHF, TRL, OpenAI preference, ShareGPT, question/answer columns),
    unpaired feedback, and annotation exports with several judgements per item (votes,
    rankings, scores), reduced to pairs with inter-annotator agreement. Unusable rows go to
    ``quarantine.jsonl`` with their line and reason; ``read = kept + quarantined``.

    Args:
        inputs: Files or folders to read (s3:// URIs on a cluster).
        data: Output folder: train.parquet, eval.parquet, quarantine.jsonl, stats.json.
        stats: Counts (read, kept, quarantined, train, eval) for the KFP UI.
        config: Options of ``alignpipe.ingest.IngestConfig`` (``alignpipe options ingest`` lists
            them), e.g. ``{"min_score_gap": 1.0}``.
        tracking_uri: MLflow tracking URI; unset = ``$MLFLOW_TRACKING_URI``.
        parent_run_id: MLflow parent run of this pipeline run.
    """
    from alignpipe.runner import run_stage

    result = run_stage(
        "ingest",
        inputs,
        data.path,
        overrides=config or {},
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
    )
    for key, value in result.metrics.items():
        stats.log_metric(key, value)
    data.metadata["format"] = result.stats["format"]
