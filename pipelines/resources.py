"""How GPU stages ask for hardware: one place to change requests for every pipeline."""

from typing import Any

from kfp.dsl import PipelineTask

# Defaults a user overrides per run through the pipeline parameters of the same names.
ACCELERATOR_TYPE = "nvidia.com/gpu"
ACCELERATOR_COUNT = 1
TRAIN_CPU = "8"
TRAIN_MEMORY = "64G"


def on_gpu(
    task: PipelineTask, accelerator_type: Any, accelerator_count: Any, cpu: Any, memory: Any
):
    """Request an accelerator, CPU and memory for a training or evaluation task."""
    task.set_accelerator_type(accelerator_type)
    task.set_accelerator_limit(accelerator_count)
    task.set_cpu_limit(cpu)
    task.set_memory_limit(memory)
    return task
