"""The SFT stage on the tiny model and the synthetic task: masking, loss, adapters, packing, resume.

Every run uses one torch thread: the tiny model is far too small to gain from more, and on a
shared CPU extra threads only contend (ten times slower here).
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from alignpipe import ingest, models, prep, sft, synthetic
from alignpipe.config import load_config
from alignpipe.errors import ConfigError, DataError
from alignpipe.runner import run_stage
from alignpipe.tracking import NullTracker

BASE_OPTIONS = {
    "training.num_threads": 1,
    "training.precision": "fp32",  # the hand-computed losses below are fp32, on a GPU too
    "training.batch_size": 16,
    "training.learning_rate": 3e-3,
    "training.max_steps": 40,
    "training.logging_steps": 10,
    "training.save_steps": 100,
    "max_length": 128,
    "peft.method": "none",
}
RESUME_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    options = synthetic.SyntheticTaskOptions(num_sft=300, num_prompts=10, num_pairs=40)
    return synthetic.write_task(options, tmp_path_factory.mktemp("task"))


@pytest.fixture(scope="module")
def data_dir(task_dir, tmp_path_factory):
    """A prep output folder of synthetic conversations (about 270 train, 30 eval)."""
    out = tmp_path_factory.mktemp("sft-data")
    prep.run(prep.PrepConfig(), [str(task_dir["sft"])], str(out))
    return str(out)


def make_config(model_dir, **overrides):
    values = {"model": str(model_dir), **BASE_OPTIONS}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(sft.SftStageConfig, None, values)


def prepared_trainer(config, data_dir, output):
    train_set, eval_set = (sft.load_conversations(data_dir, s) for s in ("train", "eval"))
    model, tokenizer = sft.load_model(config)
    trainer = sft.build_trainer(config, model, tokenizer, train_set, eval_set, output)
    return trainer, model, tokenizer, eval_set


def token_ids(tokenizer, messages, **kwargs):
    return list(tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)["input_ids"])


def prompt_length(tokenizer, messages):
    """Tokens before the assistant's reply: the prompt rendered with the generation prompt."""
    return len(token_ids(tokenizer, messages[:-1], add_generation_prompt=True))


def mean_nll(model, tokenizer, conversations, batch_size, assistant_only=True):
    """The trainer's eval loss, by hand: the token-mean NLL of each batch, averaged over the
    batches weighted by their number of conversations.

    Every synthetic conversation is one user turn and one assistant turn, so the assistant
    tokens are exactly those after the prompt rendered with the generation prompt.
    """
    batch_losses = []
    with torch.no_grad():
        for start in range(0, len(conversations), batch_size):
            total, count = 0.0, 0
            for messages in conversations[start : start + batch_size]:
                ids = token_ids(tokenizer, messages)
                first = prompt_length(tokenizer, messages) if assistant_only else 1
                logits = model(torch.tensor([ids], device=model.device)).logits[0]
                logprobs = logits.float().log_softmax(-1)
                # the token at position t is predicted from position t - 1
                targets = torch.tensor(ids[first:], device=model.device)
                total += -logprobs[first - 1 : -1].gather(1, targets[:, None]).sum().item()
                count += len(targets)
            batch_losses.append((total / count, len(conversations[start : start + batch_size])))
    return sum(loss * size for loss, size in batch_losses) / len(conversations)


def steps_of(tracker, key):
    return [step for name, _, step in tracker.metrics if name == key]


# full fine-tuning


@pytest.mark.slow
def test_full_fine_tuning_lowers_eval_loss_and_saves_the_trained_model(
    tiny_tokenizer_dir, data_dir, tmp_path
):
    config = make_config(tiny_tokenizer_dir)
    tracker = NullTracker()
    out = tmp_path / "sft"

    result = sft.run(config, data_dir, str(out), tracker=tracker)

    metrics = result.metrics
    # measured: 6.31 -> 3.2 in 40 steps; a model that learned nothing stays near ln(512) = 6.2
    assert metrics["eval_loss"] < 0.8 * metrics["eval_loss_initial"]
    assert metrics["eval_loss_initial"] == pytest.approx(6.3, abs=0.2)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["global_step"] == 40
    assert metrics["train_loss"] < metrics["eval_loss_initial"]
    assert metrics["train_seconds"] > 0
    assert "resumed_from_step" not in metrics
    assert result.resumed_from is None

    # the saved model is the trained one: its eval loss, recomputed by hand, is the reported one
    model_dir = Path(result.model_dir)
    assert model_dir == out / "model"
    assert (model_dir / "model.safetensors").is_file()
    assert not (model_dir / "adapter_config.json").exists()
    trained = models.load_causal_lm(str(model_dir))
    tokenizer = models.load_tokenizer(str(model_dir))
    conversations = [r["messages"] for r in sft.load_conversations(data_dir, "eval")]
    assert mean_nll(trained, tokenizer, conversations, 16) == pytest.approx(
        metrics["eval_loss"], rel=1e-4
    )
    base = models.load_causal_lm(str(tiny_tokenizer_dir))
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(base.state_dict()[name], trained.state_dict()[name])

    # tokens: every non-pad token of 40 batches of 16 conversations (over 2 epochs of ~270)
    train = sft.load_conversations(data_dir, "train")
    lengths = [len(token_ids(tokenizer, r["messages"])) for r in train]
    assert 40 * 16 * min(lengths) <= metrics["train_tokens"] <= 40 * 16 * max(lengths)

    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert tracker.dicts["metrics.json"] == metrics
    assert tracker.params["training.max_steps"] == "40"
    assert tracker.params["peft.method"] == "none"
    assert tracker.params["model"] == str(tiny_tokenizer_dir)
    assert steps_of(tracker, "loss") == [1, 10, 20, 30, 40]
    # eval loss is logged before training (step 0) and after it
    assert steps_of(tracker, "eval_loss")[0] == 0
    assert [d["context"] for d in tracker.datasets] == ["train", "eval"]
    assert tracker.datasets[1]["num_rows"] == len(conversations)
    assert (out / "checkpoints" / "checkpoint-40" / "trainer_state.json").is_file()


# completion-only loss


def test_labels_mask_every_token_but_the_assistant_reply(tiny_tokenizer_dir, data_dir, tmp_path):
    config = make_config(tiny_tokenizer_dir)
    trainer, _, tokenizer, _ = prepared_trainer(config, data_dir, tmp_path)
    messages = sft.load_conversations(data_dir, "train")[0]["messages"]
    example = trainer.train_dataset[0]
    ids, labels = example["input_ids"], example["labels"]

    assert ids == token_ids(tokenizer, messages)
    cut = prompt_length(tokenizer, messages)
    # BOS, <|user|>, the question, <|assistant|>: no loss
    assert tokenizer.convert_ids_to_tokens(ids[:2]) == ["<|bos|>", "<|user|>"]
    assert tokenizer.convert_ids_to_tokens(ids[cut - 1]) == "<|assistant|>"
    assert tokenizer.decode(ids[2 : cut - 1]) == messages[0]["content"]
    assert labels[:cut] == [-100] * cut
    # the reply and its EOS carry the loss, so the model learns to stop
    assert labels[cut:] == ids[cut:]
    assert tokenizer.decode(ids[cut:]) == messages[1]["content"] + "<|eos|>"

    # the collator keeps the mask and pads with -100
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    second = len(trainer.train_dataset[1]["input_ids"])
    width = batch["input_ids"].shape[1]
    assert batch["labels"][0, :cut].eq(-100).all()
    assert batch["labels"][0, cut : len(ids)].tolist() == ids[cut:]
    assert batch["labels"][1, second:].eq(-100).all()
    assert width == max(len(ids), second)


def test_without_completion_only_loss_every_token_is_a_label(
    tiny_tokenizer_dir, data_dir, tmp_path
):
    config = make_config(tiny_tokenizer_dir, completion_only_loss=False)
    trainer, _, _, _ = prepared_trainer(config, data_dir, tmp_path)
    example = trainer.train_dataset[0]
    assert example["labels"] == example["input_ids"]


def test_eval_loss_is_the_mean_nll_of_assistant_tokens(tiny_tokenizer_dir, data_dir, tmp_path):
    config = make_config(tiny_tokenizer_dir)
    trainer, model, tokenizer, eval_set = prepared_trainer(config, data_dir, tmp_path)
    conversations = [r["messages"] for r in eval_set]

    loss = trainer.evaluate()["eval_loss"]

    assistant = mean_nll(model, tokenizer, conversations, 16)
    every_token = mean_nll(model, tokenizer, conversations, 16, assistant_only=False)
    assert loss == pytest.approx(assistant, rel=1e-5)
    assert abs(every_token - assistant) > 1e-3  # the masking is visible in the number


# LoRA


def test_lora_trains_the_adapter_and_leaves_the_base_weights(
    tiny_tokenizer_dir, data_dir, tmp_path
):
    config = make_config(
        tiny_tokenizer_dir,
        peft__method="lora",
        training__max_steps=10,
        training__learning_rate=1e-2,
    )
    trainer, model, _, _ = prepared_trainer(config, data_dir, tmp_path)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    base_before = q_proj.base_layer.weight.detach().clone()
    assert q_proj.lora_B["default"].weight.abs().sum() == 0  # LoRA starts as a no-op

    trainer.train()

    assert torch.equal(q_proj.base_layer.weight, base_before)
    assert not q_proj.base_layer.weight.requires_grad
    assert q_proj.lora_B["default"].weight.abs().sum() > 0


@pytest.mark.slow
def test_lora_saves_a_merged_model_that_differs_from_the_base_by_a_low_rank_update(
    tiny_tokenizer_dir, data_dir, tmp_path
):
    config = make_config(
        tiny_tokenizer_dir,
        peft__method="lora",
        training__max_steps=20,
        training__learning_rate=1e-2,
    )
    result = sft.run(config, data_dir, str(tmp_path / "lora"))

    assert result.metrics["eval_loss"] < result.metrics["eval_loss_initial"] - 0.1
    model_dir = Path(result.model_dir)
    assert (model_dir / "model.safetensors").is_file()
    assert not (model_dir / "adapter_config.json").exists()
    merged = models.load_causal_lm(str(model_dir)).state_dict()
    base = models.load_causal_lm(str(tiny_tokenizer_dir)).state_dict()
    assert merged.keys() == base.keys()
    rank = config.peft.lora.r
    for name in base:
        delta = merged[name] - base[name]
        if ".q_proj." in name or ".v_proj." in name:  # peft's default LoRA targets for Llama
            assert delta.abs().max() > 0, name
            assert torch.linalg.matrix_rank(delta) <= rank, name
        else:
            assert torch.equal(merged[name], base[name]), name


def test_save_adapter_only_records_the_base_model(tiny_tokenizer_dir, data_dir, tmp_path):
    config = make_config(
        tiny_tokenizer_dir,
        peft__method="lora",
        save_adapter_only=True,
        training__max_steps=3,
        training__learning_rate=1e-2,
    )
    result = sft.run(config, data_dir, str(tmp_path / "adapter"))

    model_dir = Path(result.model_dir)
    assert not (model_dir / "model.safetensors").exists()
    assert (model_dir / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((model_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(Path(tiny_tokenizer_dir).resolve())
    loaded = models.load_causal_lm(str(model_dir))
    assert type(loaded).__name__ == "PeftModelForCausalLM"


# packing


def test_packed_rows_hold_several_conversations_that_do_not_see_each_other(
    tiny_tokenizer_dir, data_dir, tmp_path
):
    packed, _, tokenizer, _ = prepared_trainer(
        make_config(tiny_tokenizer_dir, packing=True), data_dir, tmp_path / "packed"
    )
    padded, _, _, _ = prepared_trainer(make_config(tiny_tokenizer_dir), data_dir, tmp_path / "pad")

    row = packed.train_dataset[0]["input_ids"]
    assert len(row) <= 128
    assert row.count(tokenizer.bos_token_id) >= 3  # several conversations in one row
    # eval batches are flattened into one sequence without padding, positions restarting
    first, second = padded.eval_dataset[0]["input_ids"], padded.eval_dataset[1]["input_ids"]
    batch = packed.data_collator([packed.eval_dataset[i] for i in range(2)])
    assert batch["input_ids"].shape == (1, len(first) + len(second))
    positions = batch["position_ids"][0].tolist()
    assert positions == list(range(len(first))) + list(range(len(second)))
    # ... and yet the loss is that of the padded batches: no attention across conversations
    assert packed.evaluate()["eval_loss"] == pytest.approx(padded.evaluate()["eval_loss"], rel=1e-5)
    # control: the same tokens as one continuous sequence give another loss
    packed.model.eval()
    device = packed.model.device
    keep = {key: batch[key].to(device) for key in ("input_ids", "labels", "position_ids")}
    joined = dict(keep, position_ids=torch.arange(len(positions), device=device)[None])
    with torch.no_grad():
        separate_loss = packed.compute_loss(packed.model, dict(keep)).item()
        joined_loss = packed.compute_loss(packed.model, joined).item()
    assert abs(separate_loss - joined_loss) > 1e-3


@pytest.mark.slow
def test_packed_training_lowers_the_loss(tiny_tokenizer_dir, data_dir, tmp_path):
    config = make_config(
        tiny_tokenizer_dir, packing=True, training__batch_size=4, training__max_steps=30
    )
    result = sft.run(config, data_dir, str(tmp_path / "packed"))
    metrics = result.metrics
    assert metrics["eval_loss"] < 0.8 * metrics["eval_loss_initial"]
    # 30 steps of 4 packed rows of at most 128 tokens, most of them full
    assert 30 * 4 * 64 < metrics["train_tokens"] <= 30 * 4 * 128


# resume

RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from alignpipe import sft
    from alignpipe.config import load_config
    from alignpipe.tracking import NullTracker

    class StallAfterStep(NullTracker):
        # Hang at the log of step 30: checkpoint-20 is complete by then (a checkpoint is saved
        # after the log of its step) and checkpoint-30 is not yet begun.
        def log_metrics(self, metrics, step=None):
            if step is not None and step >= 30:
                Path(sys.argv[3]).touch()
                time.sleep(3600)
            super().log_metrics(metrics, step)

    config = load_config(sft.SftStageConfig, None, sys.argv[4:])
    sft.run(config, sys.argv[1], sys.argv[2], tracker=StallAfterStep())
    """
)


def resume_overrides(model_dir):
    values = {**BASE_OPTIONS, "training.save_steps": 10, "training.save_total_limit": 5}
    return [f"model={model_dir}", *(f"{k}={v}" for k, v in values.items())]


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint(tiny_tokenizer_dir, data_dir, tmp_path):
    out = tmp_path / "resumed"
    stalled = tmp_path / "stalled"
    overrides = resume_overrides(tiny_tokenizer_dir)
    child_log = tmp_path / "child.log"
    # a file, not a pipe: a pipe that nobody reads fills up and blocks the child
    with child_log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-c", RESUME_SCRIPT, data_dir, str(out), str(stalled), *overrides],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + RESUME_TIMEOUT_S
        while not stalled.exists():
            if process.poll() is not None:
                tail = child_log.read_text(errors="replace")[-3000:]
                pytest.fail(f"the run ended before step 30:\n{tail}")
            if time.monotonic() > deadline:
                pytest.fail("the run did not reach step 30 in time")
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-10", "checkpoint-20"]
    state = json.loads((out / "checkpoints/checkpoint-20/trainer_state.json").read_text())
    assert state["global_step"] == 20

    tracker = NullTracker()
    config = load_config(sft.SftStageConfig, None, overrides)
    result = sft.run(config, data_dir, str(out), tracker=tracker)

    assert result.resumed_from == str(out / "checkpoints" / "checkpoint-20")
    assert result.metrics["resumed_from_step"] == 20
    assert result.metrics["global_step"] == 40
    assert tracker.tags["alignpipe.resumed_from"] == result.resumed_from
    # only steps 21-40 ran again: the first training log is at step 30
    assert steps_of(tracker, "loss") == [30, 40]
    final = json.loads((out / "checkpoints/checkpoint-40/trainer_state.json").read_text())
    assert final["global_step"] == 40
    # the token count carries over from the checkpoint
    assert result.metrics["train_tokens"] > state["num_input_tokens_seen"] > 0

    # the same 40 steps without the interruption end at the same model
    fresh = sft.run(config, data_dir, str(tmp_path / "fresh"))
    assert result.metrics["eval_loss"] == pytest.approx(fresh.metrics["eval_loss"], rel=1e-4)


def test_a_run_killed_after_its_last_checkpoint_trains_no_step_past_max_steps(
    tiny_tokenizer_dir, data_dir, tmp_path
):
    """The pod died after saving checkpoint-4 of 4, before its model: the retry trains nothing."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    config = make_config(
        tiny_tokenizer_dir,
        training__max_steps=4,
        training__save_steps=2,
        training__logging_steps=1,
        training__lr_scheduler="constant",  # a step past the end would change the weights
    )
    first = sft.run(config, data_dir, str(out))
    trained = load_file(Path(first.model_dir) / "model.safetensors")
    shutil.rmtree(first.model_dir)

    tracker = NullTracker()
    again = sft.run(config, data_dir, str(out), tracker=tracker)

    assert again.resumed_from == str(out / "checkpoints" / "checkpoint-4")
    assert (again.metrics["global_step"], again.metrics["resumed_from_step"]) == (4, 4)
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    assert steps_of(tracker, "loss") == []  # no training step was logged
    reloaded = load_file(Path(again.model_dir) / "model.safetensors")
    assert reloaded.keys() == trained.keys()
    assert all(torch.equal(reloaded[name], trained[name]) for name in trained)
    assert again.metrics["eval_loss"] == pytest.approx(first.metrics["eval_loss"], rel=1e-6)


# the shared runner, as the CLI and the KFP component call it


@pytest.mark.slow
def test_runner_trains_with_nested_overrides_and_logs_to_mlflow(
    tiny_tokenizer_dir, data_dir, tmp_path
):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = {  # the component's shape: the config dict plus the model
        "peft": {"method": "none"},
        "training": {"max_steps": 4, "logging_steps": 2, "num_threads": 1},
        "model": str(tiny_tokenizer_dir),
    }
    result = run_stage(
        "sft", data_dir, str(tmp_path / "out"), overrides=overrides, tracking_uri=uri
    )

    assert result.metrics["global_step"] == 4
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs(client.get_experiment_by_name("alignpipe").experiment_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["training.max_steps"] == "4"
    assert run.data.metrics["eval_loss"] == pytest.approx(result.metrics["eval_loss"])
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2, 4]
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {
        "conversation-train",
        "conversation-eval",
    }


# validation


def test_model_is_required():
    with pytest.raises(ConfigError, match="model="):
        load_config(sft.SftStageConfig, None, [])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["max_length=0"], "max_length must be at least 2"),
        (["dtype=float8"], "dtype must be one of"),
        (["training.max_steps=0"], "training.max_steps must be positive"),
        (["peft.method=none", "save_adapter_only=true"], "set peft.method=lora"),
        (["peft.method=prompt_tuning"], "set save_adapter_only=true"),
        (
            ["peft.method=prompt_tuning", "save_adapter_only=true", "packing=true"],
            "set packing=false",
        ),
        (["packing=maybe"], "packing must be true or false"),
        (["lora.r=8"], "unknown option lora"),
    ],
)
def test_bad_options_name_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(sft.SftStageConfig, None, ["model=some/model", *overrides])


def test_options_load_from_yaml_with_dotted_overrides(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("model: org/base\npeft:\n  method: lora\n  lora:\n    r: 4\n")
    config = load_config(sft.SftStageConfig, path, ["training.max_steps=7", "packing=true"])
    assert (config.model, config.peft.method, config.peft.lora.r) == ("org/base", "lora", 4)
    assert (config.training.max_steps, config.packing, config.completion_only_loss) == (
        7,
        True,
        True,
    )


@pytest.mark.parametrize("wanted", [False, True])
def test_gradient_checkpointing_reaches_the_trl_configs_under_its_new_name(wanted, tmp_path):
    # TRL's configs default the deprecated gradient_checkpointing to True; the option must win
    # over that default, reach transformers' activation_checkpointing, and raise no warning
    import warnings

    from trl import DPOConfig, RewardConfig, SFTConfig

    from alignpipe.training import TrainingOptions, trainer_arguments

    options = TrainingOptions(gradient_checkpointing=wanted, precision="fp32")
    for config_class in (SFTConfig, DPOConfig, RewardConfig):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            args = config_class(**trainer_arguments(options, tmp_path))
        assert args.activation_checkpointing is wanted, config_class.__name__
        assert args.gradient_checkpointing is wanted, config_class.__name__


def copy_with_template(source, dest, template):
    shutil.copytree(source, dest)
    config_path = dest / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config.pop("chat_template", None)
    config_path.write_text(json.dumps(tokenizer_config))
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    if template is not None:
        (dest / "chat_template.jinja").write_text(template)
    return dest


def test_template_without_generation_markers_fails_with_the_fix(tiny_tokenizer_dir, tmp_path):
    plain = models.CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    model_dir = copy_with_template(tiny_tokenizer_dir, tmp_path / "plain", plain)
    assert models.load_tokenizer(str(model_dir)).chat_template == plain

    with pytest.raises(ConfigError, match="set completion_only_loss=false"):
        sft.load_model(make_config(model_dir))
    # training on every token needs no markers
    _, tokenizer = sft.load_model(make_config(model_dir, completion_only_loss=False))
    assert tokenizer.chat_template == plain


def test_tokenizer_without_chat_template_fails_with_the_fix(tiny_tokenizer_dir, tmp_path):
    model_dir = copy_with_template(tiny_tokenizer_dir, tmp_path / "none", None)
    with pytest.raises(ConfigError, match="no chat template"):
        sft.load_model(make_config(model_dir, completion_only_loss=False))


def test_data_must_be_a_prep_folder_of_conversations(tiny_tokenizer_dir, task_dir, tmp_path):
    pairs = tmp_path / "pairs"
    ingest.run(ingest.IngestConfig(), [str(task_dir["votes"])], str(pairs))
    config = make_config(tiny_tokenizer_dir)
    with pytest.raises(DataError, match="not conversations"):
        sft.run(config, str(pairs), str(tmp_path / "out"))
    with pytest.raises(DataError, match="output folder of the prep stage"):
        sft.run(config, str(task_dir["sft"].parent), str(tmp_path / "out"))


def test_output_must_be_local(tiny_tokenizer_dir, data_dir):
    with pytest.raises(ConfigError, match="local --output"):
        sft.run(make_config(tiny_tokenizer_dir), data_dir, "s3://bucket/sft")
