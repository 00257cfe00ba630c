"""Pipelines composed from ``components``, and the CLI that compiles and runs them.

``python -m pipelines compile`` writes IR YAML for every pipeline in :data:`PIPELINES`;
``python -m pipelines local NAME --config FILE`` runs one on this machine under
``kfp.local.SubprocessRunner``.
"""

from __future__ import annotations

import importlib
from typing import Any

# KFP builds a graph when its module is imported, and the graphs read the cluster settings
# (pipelines/resources.py). The modules are imported on the first use of PIPELINES rather than
# with the package, so that a bad settings file is an error the CLI reports in one line.
_DEFINED_IN = {
    "dpo": ("pipelines.dpo", "dpo_pipeline"),
    "rlhf": ("pipelines.rlhf", "rlhf_pipeline"),
    "compare": ("pipelines.compare", "compare_pipeline"),
    "multitask": ("pipelines.multitask", "multitask_pipeline"),
    "contrastive": ("pipelines.contrastive", "contrastive_pipeline"),
}


def __getattr__(name: str) -> Any:
    if name != "PIPELINES":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    pipelines = {
        key: getattr(importlib.import_module(module), function)
        for key, (module, function) in _DEFINED_IN.items()
    }
    globals()["PIPELINES"] = pipelines
    return pipelines
