"""Base model component: name the model a pipeline starts from, or build a tiny one."""

from typing import Optional

from kfp.dsl import Dataset, Input, Model, Output

from components import cpu_component


@cpu_component
def base_model(
    model_ref: str,
    data: Input[Dataset],
    model: Output[Model],
    tiny_options: Optional[dict] = None,
):
    """Pass a model reference on, or build a tiny model from scratch for demos and tests.

    With ``model_ref="tiny"`` a byte-level BPE tokenizer is trained on the prepared data and a
    small randomly initialised Llama model is built for it (safetensors, in ``model``).
    Otherwise nothing is copied: ``model.metadata["reference"]`` carries the reference (hub id,
    s3:// prefix or folder) and the training stage loads it directly.

    Args:
        model_ref: ``"tiny"``, a hub id, an s3:// prefix or a folder in the image.
        data: A prep output folder; its text trains the tiny tokenizer.
        model: The tiny model, or an empty folder with the reference in its metadata.
        tiny_options: Options of ``alignpipe.models.TinyModelOptions`` (hidden_size, ...).
    """
    from alignpipe import models
    from alignpipe.config import load_config

    if model_ref != "tiny":
        model.metadata["reference"] = model_ref
        return
    # through load_config: KFP hands dict values over as floats (64.0), which it coerces
    options = load_config(models.TinyModelOptions, None, tiny_options or {})
    models.build_tiny_model(models.corpus_of(data.path), options, model.path)
