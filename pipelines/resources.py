"""How tasks run on a cluster, in one place for every pipeline: hardware, secrets, scheduling.

Two kinds of settings meet here.

Run-time settings are pipeline parameters of every pipeline, so a run changes them without a
new upload: ``accelerator_type``, ``accelerator_count``, ``train_cpu`` and ``train_memory`` size
the GPU tasks, and ``s3_secret`` and ``mlflow_secret`` name the Kubernetes secrets whose keys
become environment variables of every task (kfp-kubernetes accepts a parameter for a secret
name, so no name is baked into the YAML).

Compile-time settings are a :class:`ClusterSettings` read, when the pipelines are imported,
from the YAML file named by ``$ALIGNPIPE_CLUSTER_CONFIG`` (defaults otherwise): tolerations and
a node selector for the GPU pool, an optional PVC for the model cache (``HF_HOME``), timeouts
and retries of GPU tasks, where training stages keep checkpoints for those retries to resume
from, whether the secrets may be missing, and per-stage hardware, timeouts and retries that
replace the run-time values for the stages they name (CPU stages included). They are compile-time
because KFP builds every graph when its module is imported and kfp-kubernetes takes plain values
for them. Example file::

    gpu_node_selector: {cloud.google.com/gke-accelerator: nvidia-h100-80gb}
    model_cache_pvc: hf-cache          # a ReadWriteMany claim: parallel branches share it
    checkpoint_root: s3://ml-checkpoints/alignpipe   # retried training pods resume from here
    stages:
      ppo: {accelerator_count: 2, memory: 128G, timeout_s: 172800}
      evaluate: {retries: 0}

A pipeline (or sub-pipeline) applies all of it with one call at the end of its body,
``resources.configure(**settings)``, where ``settings`` is :func:`hardware` of its six
parameters (and what it passes on to its sub-pipelines).
A task is a GPU task when it runs on the GPU image (``@gpu_component``). kfp.local ignores the
kubernetes settings (secrets, tolerations, PVC, timeout) and the hardware requests; it honours
retries. A local run reads credentials from the environment of the process that starts it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from kfp import kubernetes
from kfp.dsl import PipelineTask, pipeline_context

from alignpipe.config import from_dict, option
from alignpipe.errors import ConfigError
from components import GPU_IMAGE

# Defaults a user overrides per run through the pipeline parameters of the same names.
ACCELERATOR_TYPE = "nvidia.com/gpu"
ACCELERATOR_COUNT = 1
TRAIN_CPU = "8"
TRAIN_MEMORY = "64G"
S3_SECRET = "alignpipe-s3"
MLFLOW_SECRET = "alignpipe-mlflow"

# Each key of a secret becomes the environment variable of the same name in every task.
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")

SETTINGS_ENV = "ALIGNPIPE_CLUSTER_CONFIG"
# CPU stages that load models and so read and fill the model cache too.
MODEL_LOADING_CPU_STAGES = frozenset({"base_model"})


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """What one stage gets instead of the pipeline-wide values; unset fields keep those."""

    accelerator_type: Optional[str] = option(None, help="accelerator resource, nvidia.com/gpu")
    accelerator_count: Optional[int] = option(None, help="accelerators; 0 runs it on CPU nodes")
    cpu: Optional[str] = option(None, help="CPU limit, e.g. 16 or 500m")
    memory: Optional[str] = option(None, help="memory limit, e.g. 128G")
    timeout_s: Optional[int] = option(None, help="seconds one attempt may run")
    retries: Optional[int] = option(None, help="retries after a failed attempt")

    def __post_init__(self) -> None:
        for name in ("accelerator_count", "timeout_s", "retries"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be 0 or more, got {value}")


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
    """Compile-time cluster settings; see the module docstring for where they come from."""

    gpu_tolerations: list[dict] = option(
        default_factory=lambda: [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ],
        help="tolerations of GPU tasks (key, operator, value, effect), for tainted GPU pools",
    )
    gpu_node_selector: dict[str, str] = option(
        default_factory=dict, help="node labels GPU tasks must run on, e.g. the GPU pool's label"
    )
    model_cache_pvc: Optional[str] = option(
        None, help="PVC mounted on model-loading tasks as the Hugging Face cache; unset = none"
    )
    model_cache_path: str = option("/cache/huggingface", help="where the cache PVC is mounted")
    timeout_s: int = option(86400, help="seconds one attempt of a GPU task may run")
    retries: int = option(2, help="retries of a failed GPU task; training resumes from checkpoints")
    retry_backoff_s: int = option(60, help="seconds before the first retry; doubles each time")
    checkpoint_root: Optional[str] = option(
        None,
        help="s3:// prefix where training stages also keep their checkpoints, under "
        "ROOT/RUN_ID/STAGE, so that a retried pod (whose output starts empty) resumes from the "
        "newest; unset = checkpoints in the output only",
    )
    secrets_optional: bool = option(
        False, help="start tasks even when a secret is missing (then the pod has no credentials)"
    )
    stages: dict[str, Any] = option(
        default_factory=dict,
        help="per-stage overrides by stage name (sft, dpo, reward_model, ppo, evaluate, ...)",
    )

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.retries < 0 or self.retry_backoff_s < 0:
            raise ConfigError("timeout_s must be positive, retries and retry_backoff_s 0 or more")
        for toleration in self.gpu_tolerations:
            unknown = set(toleration) - {"key", "operator", "value", "effect", "toleration_seconds"}
            if unknown:
                raise ConfigError(
                    f"gpu_tolerations: unknown field {sorted(unknown)[0]}; "
                    "use key, operator, value, effect, toleration_seconds"
                )
        stages = {}
        for name, values in self.stages.items():
            if isinstance(values, StageSettings):
                stages[name] = values
            else:
                stages[name] = from_dict(StageSettings, values or {}, f"stages.{name}.")
        object.__setattr__(self, "stages", stages)


def load_settings(path: Optional[str] = None) -> ClusterSettings:
    """Read settings from ``path``, else from ``$ALIGNPIPE_CLUSTER_CONFIG``, else defaults."""
    import yaml

    path = path or os.environ.get(SETTINGS_ENV)
    if not path:
        return ClusterSettings()
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(
            f"cluster settings file {path} does not exist; fix {SETTINGS_ENV}"
        ) from None
    if not isinstance(values, Mapping):
        raise ConfigError(f"cluster settings file {path} must hold a mapping of setting: value")
    try:
        return from_dict(ClusterSettings, values)
    except ConfigError as err:
        raise ConfigError(f"cluster settings file {path}: {err}") from None


SETTINGS = load_settings()
# Stage names that configure() met, so that a misspelt name in `stages` can be reported.
seen_stages: set[str] = set()


def hardware(
    accelerator_type: Any,
    accelerator_count: Any,
    cpu: Any,
    memory: Any,
    s3_secret: Any = None,
    mlflow_secret: Any = None,
) -> dict:
    """The pipeline parameters tasks are configured from, as keyword arguments.

    Pass them on to sub-pipelines (``**settings``) and to :func:`configure`. The secret names
    are in it only when given, so a sub-pipeline that takes no secret names still accepts it.
    """
    settings = {
        "accelerator_type": accelerator_type,
        "accelerator_count": accelerator_count,
        "train_cpu": cpu,
        "train_memory": memory,
    }
    if s3_secret is not None:
        settings["s3_secret"] = s3_secret
    if mlflow_secret is not None:
        settings["mlflow_secret"] = mlflow_secret
    return settings


def checkpointing(run_id: Any, settings: Optional[ClusterSettings] = None) -> dict:
    """Keyword arguments of a training component: the run id, and ``checkpoint_root`` when set.

    KFP takes no ``None`` constant, so an unset root is left out rather than passed.
    """
    settings = settings or SETTINGS
    arguments = {"kfp_run_id": run_id}
    if settings.checkpoint_root:
        arguments["checkpoint_root"] = settings.checkpoint_root
    return arguments


def configure(
    accelerator_type: Any,
    accelerator_count: Any,
    train_cpu: Any,
    train_memory: Any,
    s3_secret: Any = S3_SECRET,
    mlflow_secret: Any = MLFLOW_SECRET,
    settings: Optional[ClusterSettings] = None,
) -> None:
    """Apply the cluster settings to every task of the pipeline body being defined.

    Call it last in a ``@dsl.pipeline`` body. Every task gets the secrets; GPU tasks also get
    hardware, tolerations, node selector, timeout, retries and the model cache; CPU tasks get
    what ``stages`` sets for them (:func:`on_cpu`). Tasks that are sub-pipelines are skipped:
    their own body calls this.
    """
    settings = settings or SETTINGS
    pipeline = pipeline_context.Pipeline.get_default_pipeline()
    if pipeline is None:
        raise RuntimeError("resources.configure() works inside a @dsl.pipeline body only")
    for task in pipeline.tasks.values():
        if task.container_spec is None:
            continue
        stage = task.component_spec.name.replace("-", "_")
        seen_stages.add(stage)
        use_secrets(task, s3_secret, mlflow_secret, settings.secrets_optional)
        override = settings.stages.get(stage, StageSettings())
        if task.container_spec.image != GPU_IMAGE:
            on_cpu(task, stage, override, settings)
            if stage in MODEL_LOADING_CPU_STAGES:
                mount_model_cache(task, settings)
            continue
        count = _pick(override.accelerator_count, accelerator_count)
        on_gpu(
            task,
            _pick(override.accelerator_type, accelerator_type),
            count,
            _pick(override.cpu, train_cpu),
            _pick(override.memory, train_memory),
        )
        if not _is_zero(count):
            for toleration in settings.gpu_tolerations:
                kubernetes.add_toleration(task, **toleration)
            for key, value in settings.gpu_node_selector.items():
                kubernetes.add_node_selector(task, key, str(value))
        kubernetes.set_timeout(task, _pick(override.timeout_s, settings.timeout_s))
        retry(task, _pick(override.retries, settings.retries), settings)
        mount_model_cache(task, settings)


def on_cpu(
    task: PipelineTask, stage: str, override: StageSettings, settings: ClusterSettings
) -> None:
    """A CPU task keeps the cluster's defaults but for what ``stages.<stage>`` sets for it.

    The pipeline-wide timeout and retries are for GPU tasks; a CPU task (data prep, ingest,
    tracking, registration) gets them only when its stage names them.
    """
    if override.accelerator_type is not None or override.accelerator_count:
        raise ConfigError(
            f"cluster settings give stage {stage!r} an accelerator, but it runs on the CPU "
            f"image; remove stages.{stage}.accelerator_type and accelerator_count"
        )
    if override.cpu is not None:
        task.set_cpu_limit(override.cpu)
    if override.memory is not None:
        task.set_memory_limit(override.memory)
    if override.timeout_s is not None:
        kubernetes.set_timeout(task, override.timeout_s)
    retry(task, override.retries or 0, settings)


def retry(task: PipelineTask, retries: int, settings: ClusterSettings) -> None:
    """Retry ``task`` up to ``retries`` times, with the settings' backoff doubling each time."""
    if retries:
        task.set_retry(retries, backoff_duration=f"{settings.retry_backoff_s}s", backoff_factor=2.0)


def on_gpu(
    task: PipelineTask,
    accelerator_type: Any,
    accelerator_count: Any,
    train_cpu: Any,
    train_memory: Any,
) -> PipelineTask:
    """Request an accelerator (none when the count is a literal 0), CPU and memory."""
    if not _is_zero(accelerator_count):
        task.set_accelerator_type(accelerator_type)
        task.set_accelerator_limit(accelerator_count)
    task.set_cpu_limit(train_cpu)
    task.set_memory_limit(train_memory)
    return task


def use_secrets(task: PipelineTask, s3_secret: Any, mlflow_secret: Any, optional: bool) -> None:
    """Expose the S3 and MLflow secrets' keys as environment variables of ``task``."""
    for secret, keys in ((s3_secret, S3_SECRET_KEYS), (mlflow_secret, MLFLOW_SECRET_KEYS)):
        kubernetes.use_secret_as_env(
            task, secret_name=secret, secret_key_to_env={k: k for k in keys}, optional=optional
        )


def mount_model_cache(task: PipelineTask, settings: ClusterSettings) -> None:
    """Mount the model-cache PVC, when one is set, and point ``HF_HOME`` at it."""
    if settings.model_cache_pvc:
        kubernetes.mount_pvc(task, settings.model_cache_pvc, settings.model_cache_path)
        task.set_env_variable("HF_HOME", settings.model_cache_path)


def check_stage_names(settings: Optional[ClusterSettings] = None) -> None:
    """Raise when ``stages`` names a stage no configured pipeline has (a typo, most likely)."""
    settings = settings or SETTINGS
    unknown = sorted(set(settings.stages) - seen_stages)
    if unknown:
        raise ConfigError(
            f"cluster settings name stage {unknown[0]!r}, which no pipeline has; "
            f"stages are: {', '.join(sorted(seen_stages))}"
        )


def _is_zero(count: Any) -> bool:
    # a pipeline parameter is only known at run time; only a literal 0 means "no accelerator"
    return isinstance(count, int) and count == 0


def _pick(override: Any, value: Any) -> Any:
    return value if override is None else override
