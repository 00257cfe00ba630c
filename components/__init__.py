"""KFP components: one module per stage, each a thin wrapper around an ``alignpipe`` stage.

A component turns KFP inputs into a stage config and paths, opens the tracking context through
:func:`alignpipe.runner.run_stage`, calls the stage, and writes its outputs. Components run on
the alignpipe image (``images/``), which has the package installed, so KFP does not install
anything at run time (``install_kfp_package=False``).

The image is derived from the package version; set ``ALIGNPIPE_IMAGE`` (CPU stages) and
``ALIGNPIPE_GPU_IMAGE`` (training and evaluation) when compiling to use other tags.
"""

import functools
import os

from kfp import dsl

from alignpipe import __version__

REGISTRY = os.environ.get("ALIGNPIPE_IMAGE_REGISTRY", "ghcr.io/alignpipe")
_TAG = __version__.replace("+", "-")
CPU_IMAGE = os.environ.get("ALIGNPIPE_IMAGE", f"{REGISTRY}/alignpipe:{_TAG}")
GPU_IMAGE = os.environ.get("ALIGNPIPE_GPU_IMAGE", f"{REGISTRY}/alignpipe-cuda:{_TAG}")

cpu_component = functools.partial(dsl.component, base_image=CPU_IMAGE, install_kfp_package=False)
gpu_component = functools.partial(dsl.component, base_image=GPU_IMAGE, install_kfp_package=False)
