"""alignpipe: preference alignment of language models as Kubeflow Pipelines stages.

The library under ``alignpipe`` is what runs inside a component's container. It knows nothing
about KFP: every stage is a typed config plus a ``run()`` function, callable from a test, a
notebook, the ``alignpipe`` CLI or a pipeline component.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("alignpipe")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
