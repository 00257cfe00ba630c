"""Run a stage by name with its config and tracking: the one entry the CLI and components share.

A stage is named by its module (``prep``, ``sft``, ...); its config class is found by the
registry below, built from an optional YAML file plus overrides, and the stage's ``run()`` is
called inside a tracking context. Keeping this here, not in each KFP component, is what keeps
the components a few lines long.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from alignpipe.config import load_config
from alignpipe.errors import ConfigError

# stage name -> (module under alignpipe, config class, takes a list of inputs)
STAGES: dict[str, tuple[str, str, bool]] = {
    "prep": ("prep", "PrepConfig", True),
    "ingest": ("ingest", "IngestConfig", True),
    "sft": ("sft", "SftStageConfig", False),
    "dpo": ("dpo", "DpoStageConfig", False),
    "reward_model": ("reward_model", "RewardModelStageConfig", False),
    "ppo": ("ppo", "PpoStageConfig", False),
    "evaluate": ("evaluate", "EvalStageConfig", False),
    "multitask": ("multitask", "MultitaskStageConfig", True),
    "contrastive": ("contrastive", "ContrastiveStageConfig", False),
}


def config_class(stage: str) -> type:
    """The config dataclass of a stage."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {', '.join(sorted(STAGES))}")
    module, cls, _ = STAGES[stage]
    return getattr(importlib.import_module(f"alignpipe.{module}"), cls)


def build_config(
    stage: str, config_file: str | None = None, overrides: Mapping[str, Any] | Sequence[str] = ()
) -> Any:
    """Build a stage's config from an optional YAML file and overrides."""
    return load_config(config_class(stage), config_file, overrides)


def run_stage(
    stage: str,
    inputs: str | Sequence[str],
    output: str,
    *,
    config: Any = None,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    config_file: str | None = None,
    tracking_uri: str | None = None,
    experiment: str = "alignpipe",
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    metrics_to_parent: bool = False,
) -> Any:
    """Run one stage under a tracking run and return its result.

    Args:
        stage: The stage name (a key of ``STAGES``).
        inputs: One data folder or file, or a list of them for the data stages.
        output: Where the stage writes (a local folder; data stages also take ``s3://``).
        config: A ready config; when None it is built from ``config_file`` and ``overrides``.
        overrides: ``key=value`` strings or a mapping of dotted keys.
        config_file: A YAML file of options.
        tracking_uri: MLflow tracking URI; None falls back to ``$MLFLOW_TRACKING_URI`` and
            logs nowhere when that is unset too.
        experiment: MLflow experiment, used when there is no parent run.
        parent_run_id: The pipeline's parent run, so the stage logs as its child.
        tags: Extra tags on the stage's run (e.g. the KFP run id).
        metrics_to_parent: Also log the result's metrics on the parent run, so the MLflow
            comparison view lines up pipeline runs by them (the evaluation stage does this).

    On a machine with several GPUs (or ``$ALIGNPIPE_PROCESSES`` > 1) the data-parallel stages
    run under torchrun, one process per GPU (:func:`alignpipe.launch.local_processes`); the
    others run here on one.
    """
    from alignpipe.launch import local_processes, run_processes
    from alignpipe.tracking import MlflowTracker, resolve_tracking_uri, stage_run

    if config is None:
        config = build_config(stage, config_file, overrides)
    module, _, many = STAGES[stage]
    tracking_uri = resolve_tracking_uri(tracking_uri)
    if many:
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    elif not isinstance(inputs, str):
        if len(inputs) != 1:
            raise ConfigError(f"{stage} takes one data folder, got {len(inputs)} inputs")
        inputs = inputs[0]
    run = importlib.import_module(f"alignpipe.{module}").run
    parent_run_id = parent_run_id or None  # KFP passes "" when the pipeline is not tracked
    processes = local_processes(stage)
    if processes > 1:
        if tags:
            raise NotImplementedError(
                f"tags cannot reach the run of {stage} under torchrun; unset them, or set "
                "ALIGNPIPE_PROCESSES=1 to run it in one process"
            )
        # rank 0 of the workers opens the stage's run; opening one here would make two
        result = run_processes(
            stage,
            inputs,
            output,
            config,
            processes,
            tracking_uri=tracking_uri,
            experiment=experiment,
            parent_run_id=parent_run_id,
        )
    else:
        with stage_run(
            stage,
            tracking_uri=tracking_uri,
            experiment=experiment,
            parent_run_id=parent_run_id,
            tags=tags,
        ) as tracker:
            result = run(config, inputs, output, tracker=tracker)
            if not many:
                # the cost side of a comparison; a KFP task is its own process, so this is its peak
                peak = {"peak_rss_mb": peak_rss_mb()}
                result.metrics.update(peak)
                tracker.log_metrics(peak)
    if metrics_to_parent and tracking_uri and parent_run_id:
        MlflowTracker(tracking_uri, parent_run_id).log_metrics(result.metrics)
    return result


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
