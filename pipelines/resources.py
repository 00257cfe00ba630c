"""How GPU stages ask for hardware: one place to change requests for every pipeline."""

from typing import Any

from kfp.dsl import PipelineTask

# Defaults a user overrides per run through the pipeline parameters of the same names.
ACCELERATOR_TYPE = "nvidia.com/gpu"
ACCELERATOR_COUNT = 1
TRAIN_CPU = "8"
TRAIN_MEMORY = "64G"


def hardware(accelerator_type: Any, accelerator_count: Any, cpu: Any, memory: Any) -> dict:
    """The pipeline parameters that size GPU tasks, as keyword arguments for sub-pipelines."""
    return {
        "accelerator_type": accelerator_type,
        "accelerator_count": accelerator_count,
        "train_cpu": cpu,
        "train_memory": memory,
    }


def on_gpu(
    task: PipelineTask,
    accelerator_type: Any,
    accelerator_count: Any,
    train_cpu: Any,
    train_memory: Any,
) -> PipelineTask:
    """Request an accelerator, CPU and memory for a training or evaluation task."""
    task.set_accelerator_type(accelerator_type)
    task.set_accelerator_limit(accelerator_count)
    task.set_cpu_limit(train_cpu)
    task.set_memory_limit(train_memory)
    return task
