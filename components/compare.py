"""Comparison component: DPO against reward model + PPO, quality next to cost."""

from typing import Optional

from kfp.dsl import HTML, Input, Markdown, Metrics, Output

from components import cpu_component


@cpu_component
def compare_report(
    dpo_evaluation: Input[Metrics],
    ppo_evaluation: Input[Metrics],
    dpo_training: Input[Metrics],
    reward_model_training: Input[Metrics],
    ppo_training: Input[Metrics],
    report: Output[Markdown],
    report_html: Output[HTML],
    metrics: Output[Metrics],
    tracking_uri: Optional[str] = None,
    parent_run_id: Optional[str] = None,
):
    """Put the DPO and RLHF branches side by side: reward, win rate, KL, length, and what each
    cost in training time, tokens and peak memory.

    Both branches were evaluated against the same SFT model on the same prompts and scorers.
    The metrics (``dpo_gold_reward_policy``, ``ppo_train_seconds``, ...) also go on the MLflow
    parent run.

    Args:
        dpo_evaluation: The DPO policy's evaluation metrics.
        ppo_evaluation: The PPO policy's evaluation metrics.
        dpo_training: The DPO stage's metrics.
        reward_model_training: The reward model stage's metrics (part of the RLHF cost).
        ppo_training: The PPO stage's metrics.
        report: The comparison as Markdown.
        report_html: The same comparison as HTML.
        metrics: Every compared number, prefixed by branch.
        tracking_uri: MLflow tracking URI; unset = ``$MLFLOW_TRACKING_URI``.
        parent_run_id: MLflow parent run of this pipeline run.
    """
    import os
    import shutil
    import tempfile

    from alignpipe import compare, tracking

    branches = [
        compare.Branch("dpo", dpo_evaluation.metadata, [dpo_training.metadata]),
        compare.Branch(
            "ppo",
            ppo_evaluation.metadata,
            [reward_model_training.metadata, ppo_training.metadata],
        ),
    ]
    folder = tempfile.mkdtemp(prefix="compare-")
    numbers = compare.compare(branches, folder)
    shutil.copyfile(os.path.join(folder, f"{compare.REPORT}.md"), report.path)
    shutil.copyfile(os.path.join(folder, f"{compare.REPORT}.html"), report_html.path)
    for key, value in numbers.items():
        metrics.log_metric(key, value)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    if uri and parent_run_id:
        tracking.MlflowTracker(uri, parent_run_id).log_metrics(numbers)
