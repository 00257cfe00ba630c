"""Evaluation component: policy against its reference, with a report and a gate decision."""

from typing import Optional

from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components import gpu_component


@gpu_component
def evaluate(
    policy: Input[Model],
    reference: Input[Model],
    data: Input[Dataset],
    sft_data: Input[Dataset],
    metrics: Output[Metrics],
    report: Output[Markdown],
    report_html: Output[HTML],
    evaluation: Output[Artifact],
    base_model: Optional[Input[Model]] = None,
    reward_model: Optional[Input[Model]] = None,
    config: Optional[dict] = None,
    tracking_uri: Optional[str] = None,
    parent_run_id: Optional[str] = None,
    headline_to_parent: bool = True,
) -> bool:
    """Compare the aligned policy with the SFT model on held-out prompts and pairs.

    Generates on held-out prompts with fixed seeds and settings and reports each scorer's mean
    reward for both models, the policy's win rate, a KL estimate, response lengths, perplexity
    on held-out SFT data and preference accuracy on held-out pairs. The headline metrics also
    go on the MLflow parent run, so pipeline runs line up in MLflow's comparison view.

    Args:
        policy: The aligned model.
        reference: The model it started from (the SFT model).
        data: An ingest output folder; prompts and pairs come from its eval split.
        sft_data: A prep output folder; perplexity is measured on its eval split.
        metrics: Every metric, for the KFP UI.
        report: Markdown report with a table, the gate decision, samples and a plot.
        report_html: The same report as HTML.
        evaluation: Output folder: metrics.json, samples.jsonl, report files.
        base_model: The model fine-tuning started from (the base model step's output); the
            few-shot baseline (``few_shot`` in config) prompts it. ``base_model`` in config
            wins; with neither, the baseline prompts the reference.
        reward_model: A reward model stage's output, for the ``reward_model`` scorer (list
            it in ``scorers`` in config); ``reward_model`` in config wins.
        config: Options of ``alignpipe.evaluate.EvalStageConfig`` (``alignpipe options
            evaluate``): scorers, generation settings, gate metric and thresholds.
        tracking_uri: MLflow tracking URI; unset = ``$MLFLOW_TRACKING_URI``.
        parent_run_id: MLflow parent run of this pipeline run.
        headline_to_parent: Put the metrics on the parent run too; a pipeline that evaluates
            several policies turns this off and logs a comparison instead.

    Returns:
        Whether the policy clears the gate (a plain bool: kfp.local does not evaluate
        conditions on a NamedTuple's bool field).
    """
    import shutil

    from alignpipe.runner import run_stage

    defaults = {}
    if base_model is not None:
        defaults["base_model"] = base_model.metadata.get("reference") or base_model.path
    if reward_model is not None:
        defaults["reward_model"] = reward_model.path
    overrides = {"policy": policy.path, "reference": reference.path, "sft_data": sft_data.path}
    result = run_stage(
        "evaluate",
        data.path,
        evaluation.path,
        overrides={**defaults, **(config or {}), **overrides},
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        metrics_to_parent=headline_to_parent,
    )
    for key, value in result.metrics.items():
        metrics.log_metric(key, value)
    shutil.copyfile(result.report, report.path)
    shutil.copyfile(result.report.with_suffix(".html"), report_html.path)
    return result.passed
