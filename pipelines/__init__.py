"""Pipelines composed from ``components``, and the CLI that compiles and runs them.

``python -m pipelines compile`` writes IR YAML for every pipeline in :data:`PIPELINES`;
``python -m pipelines local NAME --config FILE`` runs one on this machine under
``kfp.local.SubprocessRunner``.
"""

from pipelines.compare import compare_pipeline
from pipelines.contrastive import contrastive_pipeline
from pipelines.dpo import dpo_pipeline
from pipelines.multitask import multitask_pipeline
from pipelines.rlhf import rlhf_pipeline

PIPELINES = {
    "dpo": dpo_pipeline,
    "rlhf": rlhf_pipeline,
    "compare": compare_pipeline,
    "multitask": multitask_pipeline,
    "contrastive": contrastive_pipeline,
}
