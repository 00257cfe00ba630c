"""Model references, safe loading and saving, PEFT adapters, and a tiny model built from scratch.

A model reference is a hub id, a local folder or an ``s3://`` prefix. Weights are read and written
as safetensors only and ``trust_remote_code`` is off unless asked for. The tiny tokenizer and model
let tests, the demo and CI run offline on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from alignpipe.config import option
from alignpipe.errors import ConfigError, DataError, ModelError

# torch, transformers, tokenizers and peft take seconds to import; they are imported inside the
# functions that need them so that `import alignpipe.models` (and the CLI's --help) stays fast.
if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
# Ids follow this order: pad 0, bos 1, eos 2, then the role markers.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS.values())
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)

# One BOS opens the conversation; every turn starts with its role marker; an assistant turn ends
# with EOS, so generation stops where a turn ends. Role markers are special tokens, so BPE merges
# never cross a turn boundary: the rendered prompt with the generation prompt is a token prefix
# of the rendered prompt + response. The {% generation %} block marks the assistant content and
# its EOS for TRL's assistant_only_loss.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "<|system|>{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}"
    "<|user|>{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{%- else -%}"
    "{{ raise_exception('unknown chat role ' ~ message['role'] ~ "
    "'; use system, user or assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

DTYPES = ("auto", "float32", "bfloat16", "float16")
PEFT_TASKS = ("CAUSAL_LM", "SEQ_CLS")
# A hub id is "name" or "owner/name" (letters, digits, "-", "_", ".").
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclasses.dataclass
class LoraOptions:
    """LoRA adapter settings (see peft's ``LoraConfig``)."""

    r: int = option(8, help="LoRA rank: width of the low-rank update; higher = more capacity.")
    alpha: float = option(16, help="LoRA scaling numerator; the update is scaled by alpha / r.")
    dropout: float = option(0.0, help="Dropout on the LoRA input, in [0, 1).")
    target_modules: list[str] | None = option(
        None,
        help=(
            "Module names to adapt (e.g. [q_proj, v_proj]), or 'all-linear'. Unset: peft's "
            "default for the architecture, or every linear layer when peft has none."
        ),
    )

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r!r}; try lora.r=8")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ConfigError(f"lora.alpha must be a number, got {self.alpha!r}; try lora.alpha=16")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}; try lora.alpha=16")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            if not self.target_modules or not all(
                isinstance(m, str) and m.strip() for m in self.target_modules
            ):
                raise ConfigError(
                    "lora.target_modules must list module names (e.g. [q_proj, v_proj]); "
                    "leave it unset for the architecture's default"
                )


@dataclasses.dataclass
class PeftOptions:
    """Parameter-efficient fine-tuning: a LoRA adapter, prompt tuning, or none (full tuning)."""

    method: Literal["none", "lora", "prompt_tuning"] = option(
        "lora",
        help=(
            "none: train every weight; lora: train a low-rank adapter; prompt_tuning: train "
            "num_virtual_tokens soft prompt embeddings in front of every input."
        ),
    )
    lora: LoraOptions = option(default_factory=LoraOptions, help="LoRA settings (method=lora).")
    num_virtual_tokens: int = option(
        8, help="Number of soft prompt tokens (method=prompt_tuning); each costs a context slot."
    )

    def __post_init__(self) -> None:
        if self.method not in ("none", "lora", "prompt_tuning"):
            raise ConfigError(
                f"peft.method must be none, lora or prompt_tuning, got {self.method!r}"
            )
        if (
            isinstance(self.num_virtual_tokens, bool)
            or not isinstance(self.num_virtual_tokens, int)
            or self.num_virtual_tokens < 1
        ):
            raise ConfigError(
                f"peft.num_virtual_tokens must be a positive integer, got "
                f"{self.num_virtual_tokens!r}; try 8"
            )


@dataclasses.dataclass
class TinyModelOptions:
    """Shape of a tiny Llama-style model trained from scratch (tests, demo, CI)."""

    vocab_size: int = option(
        512,
        help=(
            f"Target tokenizer vocabulary (at least {MIN_VOCAB_SIZE}: 256 bytes + special "
            "tokens); the model uses the trained tokenizer's actual size, which is smaller when "
            "the texts run out of merges."
        ),
    )
    hidden_size: int = option(64, help="Width of the residual stream; divisible by num_heads.")
    num_layers: int = option(2, help="Number of transformer blocks.")
    num_heads: int = option(4, help="Attention heads; hidden_size / num_heads must be even.")
    intermediate_size: int = option(128, help="Width of the MLP inside each block.")
    max_position_embeddings: int = option(
        512, help="Longest sequence in tokens the model (and its tokenizer) accepts."
    )
    seed: int = option(0, help="Seed of the random initialisation; same seed, same weights.")

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"tiny model {name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"tiny model seed must be a non-negative integer, got {self.seed!r}")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(
                f"tiny model vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + "
                f"{len(SPECIAL_TOKENS)} special tokens), got {self.vocab_size}"
            )
        head_dim, rest = divmod(self.hidden_size, self.num_heads)
        if rest or head_dim % 2:
            raise ConfigError(
                f"tiny model hidden_size / num_heads must be an even integer (rotary embeddings), "
                f"got {self.hidden_size} / {self.num_heads}; e.g. hidden_size=64, num_heads=4"
            )


# ---------------------------------------------------------------------------------------------
# references


def resolve_model(ref: str, cache_dir: Path | None = None) -> str:
    """Turn a model reference into something ``from_pretrained`` can open, without the network.

    Args:
        ref: A hub id (``owner/name``), a local folder, or an ``s3://bucket/prefix``.
        cache_dir: Where an ``s3://`` model is downloaded to; a fresh temporary folder (left
            for the process's lifetime) if unset. To fetch an ``s3://`` model once for both
            loaders, resolve it first and pass the returned folder to each.

    Returns:
        The hub id unchanged (transformers resolves it later, respecting ``HF_HUB_OFFLINE``), or
        the absolute path of a local folder holding ``config.json`` (or ``adapter_config.json``).
        A training stage's output folder resolves to the ``model/`` folder inside it.

    Raises:
        ModelError: The reference is empty, names a missing folder or one that holds no model,
            or uses an unsupported scheme.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ModelError("model reference is empty; give a hub id, a local folder or an s3:// URI")
    ref = ref.strip()

    if ref.startswith("s3://"):
        return str(_fetch_s3_model(ref, cache_dir))
    if "://" in ref:
        scheme = ref.split("://", 1)[0]
        raise ModelError(
            f"model reference {ref!r} uses unsupported scheme {scheme}://; "
            "use a hub id, a local folder or an s3:// URI"
        )

    path = Path(ref).expanduser()
    if ref.startswith(("/", ".", "~")) or path.exists():
        return str(_check_model_folder(path, ref))

    if not _HUB_ID.match(ref):
        raise ModelError(
            f"model reference {ref!r} is neither an existing folder nor a hub id (owner/name); "
            "check the spelling or the path"
        )
    return ref


# A training stage writes its model to OUTPUT/model; the output folder is a reference too.
STAGE_MODEL_DIR = "model"


def _check_model_folder(path: Path, ref: str) -> Path:
    path = path.resolve()
    if not path.exists():
        raise ModelError(f"model folder {path} does not exist (from {ref!r}); check the path")
    if not path.is_dir():
        raise ModelError(f"model reference {path} is a file; give the folder that holds it")
    nested = path / STAGE_MODEL_DIR
    # a stage's output folder holds its model under model/: full weights, or an adapter alone
    # (save_adapter_only; always so for prompt tuning)
    if not _holds_model(path) and _holds_model(nested):
        path = nested
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise ModelError(
            f"model folder {path} holds no config.json; point at the folder written by "
            "save_pretrained (or alignpipe's save_model)"
        )
    return path


def _holds_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()


def _fetch_s3_model(uri: str, cache_dir: Path | None) -> Path:
    from alignpipe import storage

    if cache_dir is None:
        dest = Path(tempfile.mkdtemp(prefix="alignpipe-model-"))
    else:
        # One stable folder per URI, so repeated resolves of one prefix share a place on disk.
        name = re.sub(r"[^\w.-]+", "_", uri[len("s3://") :].strip("/"))
        dest = Path(cache_dir).expanduser() / name
        if dest.exists():
            # The prefix is mutable: start clean so no stale file survives from an older copy.
            shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)
    logger.info("downloading model %s to %s", uri, dest)
    local = Path(storage.download(uri.rstrip("/") + "/", dest))
    return _check_model_folder(local, uri)


# ---------------------------------------------------------------------------------------------
# loading and saving


def load_tokenizer(
    ref: str, *, trust_remote_code: bool = False, cache_dir: Path | None = None
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model reference (hub id, local folder or ``s3://`` prefix).

    Args:
        ref: The model reference.
        trust_remote_code: Run tokenizer code shipped with the model; off unless you trust it.
        cache_dir: Where an ``s3://`` model is downloaded to (see :func:`resolve_model`).

    Returns:
        The tokenizer, with its chat template when the model has one.

    Raises:
        ModelError: The reference cannot be resolved or holds no tokenizer.
    """
    from transformers import AutoTokenizer

    path = resolve_model(ref, cache_dir)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelError(
            f"cannot load a tokenizer from {ref!r}: {_first_line(err)}; check that the model "
            "holds one, or pre-download hub models into the HF cache"
        ) from err


def load_causal_lm(
    ref: str,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    adapter_trainable: bool = False,
    cache_dir: Path | None = None,
) -> PreTrainedModel:
    """Load a causal language model from safetensors weights.

    A folder saved from a PEFT model (``adapter_config.json``, no ``config.json``) is loaded as
    its recorded base model with the adapter on top, and returned as a ``PeftModel``.

    Args:
        ref: A hub id, a local folder or an ``s3://`` prefix.
        dtype: ``auto`` (the dtype recorded with the weights), ``float32``, ``bfloat16`` or
            ``float16``.
        trust_remote_code: Run model code shipped with the model; off unless you trust it.
        adapter_trainable: For an adapter folder, leave the adapter weights trainable.
        cache_dir: Where an ``s3://`` model is downloaded to (see :func:`resolve_model`).

    Returns:
        The model, in eval mode as ``from_pretrained`` leaves it.

    Raises:
        ConfigError: ``dtype`` is not one of the supported names.
        ModelError: The reference cannot be resolved, or the weights are not safetensors.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = _torch_dtype(dtype)
    path = resolve_model(ref, cache_dir)
    local = Path(path)
    if local.is_dir():
        if not (local / "config.json").is_file():
            return _load_adapter(local, ref, dtype, trust_remote_code, adapter_trainable, cache_dir)
        _require_safetensors(local, "model")
    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch_dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except OSError as err:
        raise ModelError(
            f"cannot load model {ref!r}: {_first_line(err)}; check the id, or pre-download it "
            "into the HF cache (HF_HUB_OFFLINE=1 uses only the cache)"
        ) from err


def _load_adapter(
    folder: Path,
    ref: str,
    dtype: str,
    trust_remote_code: bool,
    trainable: bool,
    cache_dir: Path | None,
) -> PreTrainedModel:
    from peft import PeftModel

    _require_safetensors(folder, "adapter")
    adapter_config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    base_ref = adapter_config.get("base_model_name_or_path")
    if not base_ref:
        raise ModelError(
            f"adapter {ref!r} does not record its base model; set base_model_name_or_path in "
            "adapter_config.json (save_model's base_ref does this)"
        )
    logger.info("loading adapter %s on base model %s", ref, base_ref)
    base = load_causal_lm(
        base_ref, dtype=dtype, trust_remote_code=trust_remote_code, cache_dir=cache_dir
    )
    return PeftModel.from_pretrained(base, str(folder), is_trainable=trainable)


def _require_safetensors(folder: Path, what: str) -> None:
    if any(folder.glob("*.safetensors")):
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise ModelError(
            f"{what} folder {folder} holds no safetensors weights, only pickled .bin files, "
            "which can run code when loaded; convert it once where you trust the file "
            "(from_pretrained(path, use_safetensors=False).save_pretrained(path)) or save it "
            "with safe_serialization"
        )
    raise ModelError(f"{what} folder {folder} holds no weights (*.safetensors); check the path")


def save_model(
    model: Any,
    tokenizer: PreTrainedTokenizerBase | None,
    dest: str,
    *,
    merge_adapter: bool = False,
    base_ref: str | None = None,
) -> None:
    """Save a model and its tokenizer as safetensors to a local folder or an ``s3://`` prefix.

    A ``PeftModel`` is saved as its adapter alone, unless ``merge_adapter`` folds a LoRA adapter
    into the base weights and saves a plain model.

    Args:
        model: A ``PreTrainedModel`` or a ``PeftModel``.
        tokenizer: Saved next to the weights when given.
        dest: A local folder (created if missing) or an ``s3://bucket/prefix``.
        merge_adapter: Merge a LoRA adapter into the weights before saving. The model passed in
            is left unmerged.
        base_ref: For an adapter, the base model reference to record in ``adapter_config.json``
            (e.g. the ``s3://`` URI the base came from) in place of the local path it was loaded
            from, so the adapter loads on another machine.

    Raises:
        ConfigError: ``merge_adapter`` on a model that has no mergeable adapter.
        StorageError: Uploading to ``s3://`` failed.
    """
    if dest.startswith("s3://"):
        from alignpipe import storage

        with tempfile.TemporaryDirectory(prefix="alignpipe-save-") as tmp:
            _save_local(model, tokenizer, Path(tmp), merge_adapter, base_ref)
            storage.upload(Path(tmp), dest)
        logger.info("saved model to %s", dest)
        return
    folder = Path(dest).expanduser()
    _save_local(model, tokenizer, folder, merge_adapter, base_ref)
    logger.info("saved model to %s", folder)


def _save_local(
    model: Any,
    tokenizer: PreTrainedTokenizerBase | None,
    folder: Path,
    merge_adapter: bool,
    base_ref: str | None,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    is_peft = _is_peft_model(model)
    if merge_adapter:
        if not is_peft or not hasattr(model, "merge_and_unload"):
            raise ConfigError(
                "merge_adapter=True needs a model with a LoRA adapter; save other models without it"
            )
        # Merge a copy: merging in place would change the caller's model under it.
        import copy

        copy.deepcopy(model).merge_and_unload().save_pretrained(folder)
    else:
        model.save_pretrained(folder)
        if is_peft and base_ref is not None:
            config_path = folder / "adapter_config.json"
            adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
            adapter_config["base_model_name_or_path"] = base_ref
            config_path.write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        _make_tokenizer_config_portable(folder)


def _make_tokenizer_config_portable(folder: Path) -> None:
    # transformers 5 writes two things transformers 4 cannot read: the generic fast tokenizer as
    # "TokenizersBackend" (4.x knows it as "PreTrainedTokenizerFast"), and the extra special
    # tokens as a list under "extra_special_tokens" (4.x expects a mapping there and fails with
    # "'list' object has no attribute 'keys'"). Both releases read the list under its older name
    # "additional_special_tokens". Can go once every consumer of saved models runs 5.x.
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(config.get("extra_special_tokens"), list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    config_path.write_text(text, encoding="utf-8")


def _torch_dtype(dtype: str) -> Any:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        return "auto"
    import torch

    return getattr(torch, dtype)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


def _is_peft_model(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


# ---------------------------------------------------------------------------------------------
# PEFT


def attach_peft(model: PreTrainedModel, options: PeftOptions, task: str = "CAUSAL_LM") -> Any:
    """Wrap a model with a trainable adapter, freezing the base weights.

    Args:
        model: The base model; it is modified in place (adapter layers inserted).
        options: Which method and its settings.
        task: ``CAUSAL_LM`` for policies, ``SEQ_CLS`` for reward models (whose score head is
            then trained along with the adapter).

    Returns:
        A ``PeftModel``, or ``model`` unchanged for method ``none``.

    Raises:
        ConfigError: Unknown task, or the model already carries an adapter.
    """
    if task not in PEFT_TASKS:
        raise ConfigError(f"peft task must be one of {', '.join(PEFT_TASKS)}, got {task!r}")
    if options.method == "none":
        return model
    if _is_peft_model(model):
        raise ConfigError(
            "the model already has a PEFT adapter; load the base model, or merge the adapter "
            "(save_model(..., merge_adapter=True)) before attaching another"
        )

    from peft import get_peft_model

    config = peft_config(model, options, task)
    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info(
        "attached %s adapter: %d of %d parameters trainable (%.2f%%)",
        options.method,
        trainable,
        total,
        100.0 * trainable / max(total, 1),
    )
    return peft_model


def peft_config(model: Any, options: PeftOptions, task: str = "CAUSAL_LM") -> Any:
    """The peft config for ``options`` on ``model`` (None for ``method="none"``).

    LoRA targets default to peft's choice for the architecture, else every linear layer; the
    same config serves :func:`attach_peft` and trainers that attach adapters themselves.
    """
    if options.method == "none":
        return None
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType

    if options.method == "lora":
        lora = options.lora
        return LoraConfig(
            task_type=TaskType[task],
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=_lora_targets(model, lora.target_modules),
        )
    return PromptTuningConfig(
        task_type=TaskType[task],
        num_virtual_tokens=options.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.RANDOM,
    )


def _lora_targets(model: Any, target_modules: list[str] | None) -> list[str] | str:
    if target_modules is not None:
        if target_modules == ["all-linear"]:
            return "all-linear"
        return list(target_modules)
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = getattr(model.config, "model_type", None)
    if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    logger.info("peft has no default LoRA targets for %s; adapting every linear layer", model_type)
    return "all-linear"


# ---------------------------------------------------------------------------------------------
# tiny tokenizer and model


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer with a chat template.

    Training is local and deterministic: the same texts give the same vocabulary. Special
    tokens are ``<|pad|>`` (0), ``<|bos|>`` (1), ``<|eos|>`` (2) and the role markers
    ``<|system|>``, ``<|user|>``, ``<|assistant|>``. Pad differs from EOS, so padding never
    hides an EOS. Plain ``tokenizer(text)`` adds no BOS; the chat template writes it, once.

    Args:
        texts: Training text; any string round-trips through encode and decode, seen or not.
        vocab_size: Largest vocabulary size, at least 262 (256 bytes + special tokens). Fewer
            tokens come out when the texts have fewer distinct merges.

    Returns:
        A fast tokenizer whose chat template marks assistant turns for
        ``return_assistant_tokens_mask`` and TRL's ``assistant_only_loss``.

    Raises:
        ConfigError: ``vocab_size`` is too small.
        DataError: ``texts`` is empty.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ConfigError(f"vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} "
            f"special tokens), got {vocab_size}"
        )
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    seen = 0

    def counted(items: Iterable[str]) -> Iterator[str]:
        nonlocal seen
        for text in items:
            if not isinstance(text, str):
                raise DataError(
                    f"tokenizer training text #{seen} is {type(text).__name__}, not str"
                )
            seen += 1
            yield text

    backend = Tokenizer(models.BPE())
    # No prefix space: a word after a role marker tokenizes the same as at the start of a text,
    # which the prompt-prefix property of the chat template relies on.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(counted(texts), trainer=trainer)
    if seen == 0:
        raise DataError("no texts to train the tokenizer on; pass at least one string")

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS.values()),
        # Decoding must give back the exact text; the cleanup would drop spaces before ".".
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    logger.info("trained a byte-level BPE tokenizer of %d tokens on %d texts", len(tokenizer), seen)
    return tokenizer


def build_tiny_causal_lm(
    options: TinyModelOptions, tokenizer: PreTrainedTokenizerBase
) -> PreTrainedModel:
    """Build a randomly initialised small Llama-style causal LM for a tokenizer.

    Args:
        options: The model's shape and seed. The vocabulary is the tokenizer's size.
        tokenizer: Gives the vocabulary size and the BOS, EOS and pad ids.

    Returns:
        A ``LlamaForCausalLM`` in float32, identical for the same options and tokenizer.

    Raises:
        ModelError: The tokenizer lacks a BOS, EOS or pad token.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ModelError(
            f"tokenizer has no {', '.join(missing)}; use alignpipe's train_tokenizer or set "
            "the tokenizer's bos/eos/pad tokens"
        )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=options.hidden_size,
        num_hidden_layers=options.num_layers,
        num_attention_heads=options.num_heads,
        num_key_value_heads=options.num_heads,
        intermediate_size=options.intermediate_size,
        max_position_embeddings=options.max_position_embeddings,
        # Tied input/output embeddings keep the parameter count of a tiny model down.
        tie_word_embeddings=True,
        **ids,
    )
    # A private RNG stream: the same seed gives the same weights whatever ran before, and the
    # caller's global RNG state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**ids)
    logger.info("built a tiny Llama model of %d parameters", model.num_parameters())
    return model


def build_tiny_model(
    texts: Iterable[str], options: TinyModelOptions, dest: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Train a tokenizer on ``texts`` and build a tiny model for it, optionally saving both.

    Args:
        texts: Tokenizer training text.
        options: The model's shape, target vocabulary and seed.
        dest: A local folder or ``s3://`` prefix to save to; not saved when unset.

    Returns:
        ``(model, tokenizer)``.
    """
    tokenizer = train_tokenizer(texts, vocab_size=options.vocab_size)
    tokenizer.model_max_length = options.max_position_embeddings
    model = build_tiny_causal_lm(options, tokenizer)
    if dest is not None:
        save_model(model, tokenizer, dest)
    return model, tokenizer


def corpus_of(data_folder: str) -> list[str]:
    """Every message text of a data stage's output folder (both splits), to train a tokenizer."""
    from alignpipe.data.build import read_split

    texts = []
    for split in ("train", "eval"):
        for record in read_split(data_folder, split):
            for value in record.values():
                if isinstance(value, list):
                    texts.extend(m["content"] for m in value if isinstance(m, dict))
                elif isinstance(value, str):
                    texts.append(value)
    return texts
