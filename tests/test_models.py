"""Tests of alignpipe.models: references, safe loading, PEFT, tiny tokenizer and model."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignpipe.config import load_config
from alignpipe.errors import ConfigError, DataError, ModelError
from alignpipe.models import (
    CHAT_TEMPLATE,
    LoraOptions,
    PeftOptions,
    TinyModelOptions,
    attach_peft,
    build_tiny_causal_lm,
    build_tiny_model,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
    save_model,
    train_tokenizer,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a small corpus for a tiny tokenizer.",
    "Ünïcödé text: naïve café, 日本語, emoji ✓.",
    "Be brief. Answer the question and stop.",
    "What is two plus two? Two plus two is four.",
] * 4
VOCAB = 300
SMALL = TinyModelOptions(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4)

CONVERSATIONS = [
    # (prompt messages, assistant response)
    ([{"role": "user", "content": "Hello world"}], "Hi there."),
    (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is two plus two?"},
        ],
        "Four.",
    ),
    (
        [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "Colour of the sky?"},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "And grass? 日本語 ✓"},
        ],
        " Green, naïvely.",
    ),
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=VOCAB)


@pytest.fixture
def model(tok):
    return build_tiny_causal_lm(SMALL, tok).eval()


def _ids(encoding) -> list[int]:
    # apply_chat_template(tokenize=True) returns a dict-like encoding in transformers 5.
    return list(encoding["input_ids"]) if hasattr(encoding, "keys") else list(encoding)


def _batch(tok) -> dict[str, torch.Tensor]:
    texts = ["Hello world, the fox.", "Two plus two is four!"]
    enc = tok(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {**enc, "labels": labels}


# ---------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_special_tokens_have_fixed_ids_and_pad_differs_from_eos(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>"]) == [3, 4, 5]
    assert len(tok) == VOCAB
    # Plain encoding adds no BOS/EOS: the chat template owns them.
    ids = tok("hello")["input_ids"]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids


@pytest.mark.parametrize(
    "text",
    [
        "Ünïcödé text: naïve café, 日本語, emoji ✓.",
        "never seen: Ωμέγα Ж ß 🦊 and tabs\tand\nnewlines  two spaces .",
        " leading space and trailing space ",
    ],
)
def test_tokenizer_round_trips_text_exactly(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text


def test_tokenizer_training_is_deterministic():
    first = train_tokenizer(TEXTS, vocab_size=VOCAB)
    second = train_tokenizer(list(TEXTS), vocab_size=VOCAB)
    assert first.get_vocab() == second.get_vocab()
    sample = "What is the colour of the lazy fox?"
    assert first(sample)["input_ids"] == second(sample)["input_ids"]
    other = train_tokenizer(["completely different words here"] * 20, vocab_size=VOCAB)
    assert other.get_vocab() != first.get_vocab()


def test_tokenizer_merges_frequent_words(tok):
    # "Ġtwo" occurs 8 times per copy of the corpus; a byte-level tokenizer with merges encodes
    # " two" in fewer tokens than its 4 bytes.
    assert len(tok(" two")["input_ids"]) < 4


def test_tokenizer_rejects_too_small_vocab_and_empty_texts():
    with pytest.raises(ConfigError, match="at least 262"):
        train_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(DataError, match="no texts"):
        train_tokenizer([], vocab_size=VOCAB)


# ---------------------------------------------------------------------------------------------
# chat template


def test_chat_template_renders_role_markers(tok):
    messages, response = CONVERSATIONS[1]
    rendered = tok.apply_chat_template(
        [*messages, {"role": "assistant", "content": response}], tokenize=False
    )
    assert rendered == (
        "<|bos|><|system|>Be brief.<|user|>What is two plus two?<|assistant|>Four.<|eos|>"
    )
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|system|>Be brief.<|user|>What is two plus two?<|assistant|>"


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_chat_template_prompt_is_token_prefix_with_one_bos(tok, index):
    messages, response = CONVERSATIONS[index]
    full_messages = [*messages, {"role": "assistant", "content": response}]
    prompt = _ids(tok.apply_chat_template(messages, add_generation_prompt=True))
    full = _ids(tok.apply_chat_template(full_messages))

    assert full[: len(prompt)] == prompt
    # The rest is exactly the response's own tokens followed by one EOS.
    assert full[len(prompt) :] == [*tok(response)["input_ids"], tok.eos_token_id]
    for ids in (prompt, full):
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert full[-1] == tok.eos_token_id
    assert not any(a == b == tok.eos_token_id for a, b in itertools.pairwise(full))
    n_assistant = sum(m["role"] == "assistant" for m in full_messages)
    assert full.count(tok.eos_token_id) == n_assistant


def test_assistant_mask_covers_assistant_content_and_eos_only(tok):
    messages, response = CONVERSATIONS[2]
    full_messages = [*messages, {"role": "assistant", "content": response}]
    out = tok.apply_chat_template(
        full_messages, return_assistant_tokens_mask=True, return_dict=True
    )
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    assert len(mask) == len(ids)

    # Expected by hand: after each <|assistant|> marker, the content tokens and the EOS.
    expected = []
    for m in full_messages:
        marker = [0]  # the role marker token
        content = tok(m["content"])["input_ids"]
        if m["role"] == "assistant":
            expected += marker + [1] * (len(content) + 1)
        else:
            expected += marker + [0] * len(content)
    expected = [0, *expected]  # BOS
    assert mask == expected
    masked = [t for t, keep in zip(ids, mask, strict=True) if keep]
    assert tok.decode(masked) == "Blue.<|eos|> Green, naïvely.<|eos|>"


def test_chat_template_rejects_unknown_role(tok):
    with pytest.raises(Exception, match="unknown chat role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# ---------------------------------------------------------------------------------------------
# tiny model


def test_tiny_model_forward_shapes_and_initial_loss(tok, model):
    batch = _batch(tok)
    with torch.no_grad():
        out = model(**batch)
    batch_size, seq = batch["input_ids"].shape
    assert out.logits.shape == (batch_size, seq, VOCAB)
    loss = out.loss.item()
    # Small random init gives near-uniform predictions: cross-entropy ≈ ln(vocab) = 5.70.
    assert math.isfinite(loss)
    assert abs(loss - math.log(VOCAB)) < 0.15


def test_tiny_model_config_matches_tokenizer(tok, model):
    assert model.config.vocab_size == len(tok) == VOCAB
    for cfg in (model.config, model.generation_config):
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 0)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2


def test_tiny_model_is_deterministic_per_seed_and_leaves_global_rng(tok):
    torch.manual_seed(123)
    a = build_tiny_causal_lm(SMALL, tok).state_dict()
    after_build = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after_build, torch.rand(3))

    b = build_tiny_causal_lm(SMALL, tok).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    reseeded = TinyModelOptions(vocab_size=VOCAB, seed=1)
    c = build_tiny_causal_lm(reseeded, tok).state_dict()
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_tiny_model_options_validation():
    with pytest.raises(ConfigError, match="even integer"):
        TinyModelOptions(hidden_size=60, num_heads=4)  # head_dim 15
    with pytest.raises(ConfigError, match="at least 262"):
        TinyModelOptions(vocab_size=200)
    with pytest.raises(ConfigError, match="num_layers"):
        TinyModelOptions(num_layers=0)
    with pytest.raises(ConfigError, match="seed"):
        TinyModelOptions(seed=-1)


# ---------------------------------------------------------------------------------------------
# save, load, resolve


def test_save_and_load_round_trip_gives_identical_logits(tmp_path, tok, model):
    dest = tmp_path / "tiny"
    save_model(model, tok, str(dest))

    assert (dest / "model.safetensors").is_file()
    assert not list(dest.rglob("*.bin"))
    tokenizer_config = json.loads((dest / "tokenizer_config.json").read_text())
    # Written so that transformers 4.x loads it too (see _make_tokenizer_config_portable).
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["additional_special_tokens"] == [
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
    ]
    assert "extra_special_tokens" not in tokenizer_config
    assert tokenizer_config["clean_up_tokenization_spaces"] is False

    loaded = load_causal_lm(str(dest))
    loaded_tok = load_tokenizer(str(dest))
    batch = _batch(tok)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    assert loaded.dtype == torch.float32
    assert (loaded.config.bos_token_id, loaded.config.eos_token_id) == (1, 2)

    assert loaded_tok.get_vocab() == tok.get_vocab()
    assert (loaded_tok.pad_token_id, loaded_tok.eos_token_id) == (0, 2)
    assert loaded_tok.decode([1, 4, 5, 2, 0], skip_special_tokens=True) == ""
    messages, response = CONVERSATIONS[2]
    conversation = [*messages, {"role": "assistant", "content": response}]
    assert _ids(loaded_tok.apply_chat_template(conversation)) == _ids(
        tok.apply_chat_template(conversation)
    )
    text = "naïve café ✓ 🦊"
    assert loaded_tok.decode(loaded_tok(text)["input_ids"]) == text


def test_load_with_explicit_dtype(tmp_path, tok, model):
    save_model(model, tok, str(tmp_path / "m"))
    assert load_causal_lm(str(tmp_path / "m"), dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype must be one of"):
        load_causal_lm(str(tmp_path / "m"), dtype="fp8")


def test_pickle_only_folder_is_refused(tmp_path, model):
    folder = tmp_path / "legacy"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="holds no safetensors weights"):
        load_causal_lm(str(folder))


def test_missing_and_empty_folders_are_refused(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelError, match=re.escape(str(missing))):
        resolve_model(str(missing))
    with pytest.raises(ModelError, match="does not exist"):
        load_causal_lm(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=re.escape("holds no config.json")):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("./surely-not-here")


def test_local_folder_resolves_to_absolute_path(tmp_path, tok, model, monkeypatch):
    save_model(model, tok, str(tmp_path / "m"))
    monkeypatch.chdir(tmp_path)
    assert resolve_model("m") == str(tmp_path / "m")
    assert resolve_model("./m") == str(tmp_path / "m")


def test_hub_id_is_returned_unchanged_without_network(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("resolve_model must not open a connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model("gpt2") == "gpt2"


def test_uncached_hub_model_offline_is_a_model_error(tmp_path):
    # huggingface_hub reads HF_HUB_OFFLINE at import, hence a fresh interpreter.
    code = (
        "from alignpipe.models import load_causal_lm, load_tokenizer\n"
        "from alignpipe.errors import ModelError\n"
        "for load in (load_causal_lm, load_tokenizer):\n"
        "    try:\n"
        "        load('nobody/no-such-model')\n"
        "    except ModelError as err:\n"
        "        print(err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    lines = out.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("cannot load model 'nobody/no-such-model': ")
    assert "pre-download it into the HF cache" in lines[0]
    assert lines[1].startswith("cannot load a tokenizer from 'nobody/no-such-model': ")


def test_malformed_references_are_refused():
    with pytest.raises(ModelError, match="empty"):
        resolve_model("  ")
    with pytest.raises(ModelError, match="unsupported scheme gs://"):
        resolve_model("gs://bucket/model")
    with pytest.raises(ModelError, match="neither an existing folder nor a hub id"):
        resolve_model("not a model id!")


def test_build_tiny_model_saves_to_dest(tmp_path):
    options = TinyModelOptions(vocab_size=VOCAB, max_position_embeddings=128, seed=3)
    model, tok = build_tiny_model(TEXTS, options, dest=str(tmp_path / "tiny"))
    assert tok.model_max_length == 128
    loaded = load_causal_lm(str(tmp_path / "tiny"))
    assert loaded.config.max_position_embeddings == 128
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert load_tokenizer(str(tmp_path / "tiny")).model_max_length == 128


# ---------------------------------------------------------------------------------------------
# PEFT


def _snapshot(model, adapter: bool) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().clone()
        for name, p in model.named_parameters()
        if (("lora_" in name) or ("prompt_encoder" in name)) == adapter
    }


def _one_step(model, batch) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    model.eval()


def test_lora_trains_only_the_adapter_and_disabling_it_restores_the_base(tok, model):
    batch = _batch(tok)
    with torch.no_grad():
        base_logits = model(**batch).logits

    peft_model = attach_peft(model, PeftOptions(method="lora", lora=LoraOptions(r=8)))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # Default targets for Llama are q_proj and v_proj: 2 layers x 2 modules x (8x64 + 64x8).
    assert sum(p.numel() for n, p in peft_model.named_parameters() if n in trainable) == 4096

    base_before = _snapshot(peft_model, adapter=False)
    adapter_before = _snapshot(peft_model, adapter=True)
    _one_step(peft_model, batch)
    base_after = _snapshot(peft_model, adapter=False)
    adapter_after = _snapshot(peft_model, adapter=True)

    assert base_before.keys() == base_after.keys()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    changed = [k for k in adapter_before if not torch.equal(adapter_before[k], adapter_after[k])]
    # B starts at zero, so the first step moves every B (A gets no gradient yet).
    assert sorted(changed) == sorted(k for k in adapter_before if "lora_B" in k)

    with torch.no_grad():
        adapted = peft_model(**batch).logits
        with peft_model.disable_adapter():
            disabled = peft_model(**batch).logits
    assert torch.equal(disabled, base_logits)
    assert not torch.allclose(adapted, base_logits)


def test_lora_target_modules_option(tok, model):
    options = PeftOptions(lora=LoraOptions(r=4, target_modules=["o_proj"]))
    peft_model = attach_peft(model, options)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all("o_proj.lora_" in n for n in trainable)
    assert peft_model.get_nb_trainable_parameters()[0] == 2 * (4 * 64 + 64 * 4)
    with pytest.raises(ConfigError, match="already has a PEFT adapter"):
        attach_peft(peft_model, options)


def test_method_none_returns_the_model_unchanged(model):
    assert attach_peft(model, PeftOptions(method="none")) is model
    assert all(p.requires_grad for p in model.parameters())


def test_prompt_tuning_trains_only_the_soft_prompt(tok, model):
    batch = _batch(tok)
    peft_model = attach_peft(model, PeftOptions(method="prompt_tuning", num_virtual_tokens=5))
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0][1].shape == (5, 64)

    with torch.no_grad():
        out = peft_model(**batch)
    batch_size, seq = batch["input_ids"].shape
    assert out.logits.shape == (batch_size, 5 + seq, VOCAB)

    base_before = _snapshot(peft_model, adapter=False)
    prompt_before = _snapshot(peft_model, adapter=True)
    _one_step(peft_model, batch)
    base_after = _snapshot(peft_model, adapter=False)
    prompt_after = _snapshot(peft_model, adapter=True)
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    assert all(not torch.equal(prompt_before[k], prompt_after[k]) for k in prompt_before)


def test_adapter_save_and_load_round_trip(tmp_path, tok, model):
    base_dir = tmp_path / "base"
    save_model(model, tok, str(base_dir))
    base = load_causal_lm(str(base_dir))
    peft_model = attach_peft(base, PeftOptions(lora=LoraOptions(r=4)))
    batch = _batch(tok)
    _one_step(peft_model, batch)
    with torch.no_grad():
        expected = peft_model(**batch).logits

    # The adapter records the base reference given, not the path it happened to load from.
    save_model(peft_model, tok, str(tmp_path / "adapter"), base_ref=str(base_dir))
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_dir)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter" / "config.json").exists()

    reloaded = load_causal_lm(str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
    assert not any(p.requires_grad for p in reloaded.parameters())
    trainable = load_causal_lm(str(tmp_path / "adapter"), adapter_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 2 * 2 * (4 * 64 + 64 * 4)

    # Merged: a plain model with the same outputs; the caller's model keeps its adapter.
    save_model(peft_model, tok, str(tmp_path / "merged"), merge_adapter=True)
    merged = load_causal_lm(str(tmp_path / "merged"))
    assert type(merged).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        with peft_model.disable_adapter():
            assert not torch.allclose(peft_model(**batch).logits, expected)
    with pytest.raises(ConfigError, match="merge_adapter=True needs"):
        save_model(model, tok, str(tmp_path / "x"), merge_adapter=True)


def test_peft_options_validation_and_overrides():
    with pytest.raises(ConfigError, match=re.escape("lora.r")):
        LoraOptions(r=0)
    with pytest.raises(ConfigError, match=re.escape("lora.dropout")):
        LoraOptions(dropout=1.0)
    with pytest.raises(ConfigError, match="target_modules"):
        LoraOptions(target_modules=[])
    with pytest.raises(ConfigError, match=re.escape("peft.method")):
        PeftOptions(method="adapter")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        PeftOptions(num_virtual_tokens=0)
    options = load_config(
        PeftOptions, overrides=["lora.r=4", "lora.target_modules=[q_proj, k_proj]"]
    )
    assert options.lora.r == 4 and options.lora.target_modules == ["q_proj", "k_proj"]
    assert options.method == "lora" and options.lora.alpha == 16


def test_chat_template_constant_is_the_tokenizer_template(tok):
    assert tok.chat_template == CHAT_TEMPLATE
    assert "{% generation %}" in CHAT_TEMPLATE and "{% endgeneration %}" in CHAT_TEMPLATE


def test_import_does_not_load_torch_or_transformers():
    code = (
        "import sys, alignpipe.models; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_model_folder_path_is_in_error(tmp_path):
    folder = tmp_path / "weights-missing"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="holds no weights"):
        load_causal_lm(str(folder))


# ---------------------------------------------------------------------------------------------
# s3:// references (a real SeaweedFS server, see conftest.py)


@pytest.mark.integration
def test_s3_model_round_trip_and_cache(s3_env, tmp_path, tok, model):
    uri = f"{s3_env}/models/tiny"
    save_model(model, tok, uri)

    cache = tmp_path / "cache"
    folder = Path(resolve_model(uri, cache_dir=cache))
    assert folder.parent == cache
    assert sorted(p.name for p in folder.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    # A second resolve starts from a clean copy: nothing stale survives from the last one.
    (folder / "stale.bin").write_bytes(b"old")
    assert Path(resolve_model(uri, cache_dir=cache)) == folder
    assert not (folder / "stale.bin").exists()

    batch = _batch(tok)
    loaded = load_causal_lm(uri, cache_dir=cache)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert load_tokenizer(uri, cache_dir=cache).get_vocab() == tok.get_vocab()

    # An adapter that names its base by URI loads anywhere the bucket is reachable.
    peft_model = attach_peft(loaded, PeftOptions(lora=LoraOptions(r=4)))
    _one_step(peft_model, batch)
    with torch.no_grad():
        expected = peft_model(**batch).logits
    save_model(peft_model, tok, f"{s3_env}/models/adapter", base_ref=uri)
    reloaded = load_causal_lm(f"{s3_env}/models/adapter", cache_dir=cache)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)


@pytest.mark.integration
def test_s3_prefix_without_config_is_refused(s3_env, s3_raw, tmp_path):
    bucket = s3_env[len("s3://") :]
    s3_raw.put_object(Bucket=bucket, Key="junk/readme.txt", Body=b"not a model")
    with pytest.raises(ModelError, match=re.escape("holds no config.json")):
        resolve_model(f"{s3_env}/junk", cache_dir=tmp_path)


def test_a_stage_output_folder_resolves_to_its_model(tmp_path, tiny_tokenizer_dir):
    import shutil

    from alignpipe.models import resolve_model

    stage_output = tmp_path / "sft-output"
    shutil.copytree(tiny_tokenizer_dir, stage_output / "model")
    (stage_output / "checkpoints").mkdir()
    assert resolve_model(str(stage_output)) == str((stage_output / "model").resolve())
