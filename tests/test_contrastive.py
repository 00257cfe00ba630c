"""Contrastive stage: retrieval and correlation math by hand, data to training rows, the config's
checks, and training runs on the STS sample with a tiny encoder built from scratch.

One module-scoped fixture preps the STS Benchmark sample (../shared/data) into train and eval
splits and builds a tiny Llama on its text; the runs check outcomes on the held-out split.
"""

import json

import pytest
import torch

from alignpipe import contrastive
from alignpipe.config import load_config
from alignpipe.contrastive import ContrastiveStageConfig
from alignpipe.errors import ConfigError, DataError
from alignpipe.tracking import NullTracker

# a run small enough for the test budget: full fine-tuning of the tiny model (LoRA on weights
# that were never trained teaches little), few steps, a held-out sample of 300 pairs; one torch
# thread, which is also the fastest on a busy 2-core machine
TRAINING = {"batch_size": 32, "learning_rate": 2e-3, "save_steps": 1000, "num_threads": 1}
FAST = {
    "peft": {"method": "none"},
    "training": {**TRAINING, "max_steps": 30},
    "max_length": 48,
    "max_eval_pairs": 300,
}


def config(**overrides) -> ContrastiveStageConfig:
    return load_config(ContrastiveStageConfig, None, {"model": "unused", **overrides})


def row(anchor, positive, negative=None, score=None):
    return {"anchor": anchor, "positive": positive, "negative": negative, "score": score}


# ---------------------------------------------------------------------------------------------
# math on hand-sized inputs


def test_retrieval_metrics_by_hand():
    similarity = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
    # query 0: its target (0.9) is first -> rank 1; query 1: 0.8 beats its 0.3 -> rank 2
    metrics = contrastive.retrieval_metrics(similarity, [0, 1])
    assert metrics["eval_accuracy_at_1"] == pytest.approx(0.5)
    assert metrics["eval_mrr"] == pytest.approx((1 / 1 + 1 / 2) / 2)


def test_retrieval_counts_a_tie_against_the_target():
    # an encoder that maps every text to one vector must not look perfect
    metrics = contrastive.retrieval_metrics(torch.ones(2, 3), [0, 2])
    assert metrics["eval_accuracy_at_1"] == 0.0
    assert metrics["eval_mrr"] == pytest.approx(1 / 3)


def test_spearman_by_hand():
    assert contrastive.spearman([0.1, 0.5, 0.3], [1.0, 5.0, 2.0]) == pytest.approx(1.0)
    assert contrastive.spearman([0.3, 0.2, 0.1], [1.0, 2.0, 3.0]) == pytest.approx(-1.0)
    # ranks (1, 3, 2) against (1, 2, 3): 1 - 6 * (0 + 1 + 1) / (3 * 8) = 0.5
    assert contrastive.spearman([0.1, 0.9, 0.5], [1.0, 2.0, 3.0]) == pytest.approx(0.5)
    assert contrastive.spearman([0.4, 0.4, 0.4], [1.0, 2.0, 3.0]) == 0.0


# ---------------------------------------------------------------------------------------------
# data to training rows


def test_report_shows_each_held_out_metric_before_and_after(tmp_path):
    metrics = {
        "eval_mrr_initial": 0.25,
        "eval_mrr": 0.5,
        "eval_accuracy_at_1_initial": 0.1,
        "eval_accuracy_at_1": 0.3,
        "train_loss": 1.0,
    }
    text = contrastive.write_report(metrics, tmp_path).read_text()
    assert text.splitlines()[2:] == [
        "| held-out metric | untrained encoder | trained encoder | change |",
        "|---|---|---|---|",
        "| retrieval accuracy@1 | 0.1 | 0.3 | +0.2 |",
        "| retrieval MRR | 0.25 | 0.5 | +0.25 |",
    ]
    assert "<td>retrieval MRR</td><td>0.25</td>" in (tmp_path / "report.html").read_text()
    with pytest.raises(DataError, match="pass the contrastive stage's metrics"):
        contrastive.write_report({"train_loss": 1.0}, tmp_path)


def test_preference_pairs_become_triplets():
    record = {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
        ],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "Lyon, I think."}],
        "margin": 1.0,
        "annotator": None,
        "source": None,
    }
    assert contrastive.preference_triplet(record) == row(
        "Be brief.\nCapital of France?", "Paris.", "Lyon, I think."
    )


def test_triplets_and_pairs_train_side_by_side_under_an_in_batch_loss():
    rows = [
        row("a1", "p1", "n1"),
        row("a2", "p2", "n2"),
        row("a3", "p3"),
        row("a4", "p4", score=4.5),  # 0.9 of 5: a positive pair
        row("a5", "p5", score=1.0),  # 0.2 of 5: not a positive, left out
    ]
    data = contrastive.training_set(rows, "mnrl", config())
    # the column order is what the loss reads: anchor, positive, then the hard negative
    assert data["triplets"].column_names == ["anchor", "positive", "negative"]
    assert data["triplets"]["negative"] == ["n1", "n2"]
    assert data["pairs"].column_names == ["anchor", "positive"]
    assert data["pairs"]["anchor"] == ["a3", "a4"]


def test_scored_pairs_are_scaled_for_a_similarity_loss():
    rows = [row("a", "b", score=5.0), row("c", "d", score=1.5)]
    data = contrastive.training_set(rows, "cosent", config())
    assert data.column_names == ["sentence1", "sentence2", "score"]
    assert data["score"] == pytest.approx([1.0, 0.3])
    assert contrastive.resolve_loss("auto", rows) == "cosent"
    assert contrastive.resolve_loss("auto", [*rows, row("e", "f")]) == "mnrl"


@pytest.mark.parametrize(
    ("rows", "loss", "message"),
    [
        ([row("a", "b", score=3.0), row("c", "d")], "cosent", "use loss=mnrl for unscored"),
        ([row("a", "b", score=7.0), row("c", "d", score=1.0)], "cosine", "set score_scale"),
        ([row("a", "b", score=1.0), row("c", "d", score=2.0)], "mnrl", "lower positive_thresh"),
    ],
)
def test_rows_the_loss_cannot_use_fail_with_the_fix(rows, loss, message):
    with pytest.raises(DataError, match=message):
        contrastive.training_set(rows, loss, config())


def test_conversations_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"messages": [[{"role": "user", "content": "hi"}]], "task": [None]})
    for split in ("train", "eval"):
        pq.write_table(table, tmp_path / f"{split}.parquet")
    with pytest.raises(DataError, match="conversations train with sft"):
        contrastive.load_text_pairs(str(tmp_path), "train")


# ---------------------------------------------------------------------------------------------
# config checks


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"peft": {"method": "prompt_tuning"}, "save_adapter_only": True}, "peft.method=lora"),
        ({"save_adapter_only": True}, "save_adapter_only=false"),
        ({"training": {"batch_size": 1}}, "batch_size to 2 or more"),
        ({"loss": "cached_mnrl", "mini_batch_size": 64}, "lower mini_batch_size"),
        ({"positive_threshold": 0.0}, "positive_threshold must be in"),
        ({"score_scale": 0}, "score_scale must be positive"),
        ({"max_eval_pairs": 1}, "max_eval_pairs must be at least 2"),
        ({"max_length": 1}, "max_length must be an integer of at least 2"),
        ({"loss": "triplet"}, "loss must be one of"),
        ({"pooling": "attention"}, "pooling must be one of"),
    ],
)
def test_config_checks_name_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(**overrides)


def test_config_needs_a_model():
    with pytest.raises(ConfigError, match="contrastive needs a model"):
        load_config(ContrastiveStageConfig, None, {})


# ---------------------------------------------------------------------------------------------
# training on the STS sample


@pytest.fixture(scope="module")
def sts(sample_data, tmp_path_factory):
    """The STS sample split 80/20 by prep, and a tiny Llama whose tokenizer knows its text."""
    from alignpipe import models, prep
    from alignpipe.data.build import read_split

    root = tmp_path_factory.mktemp("contrastive")
    source = sample_data / "sts_benchmark" / "sts-train.csv"
    prep.run(prep.PrepConfig(eval_fraction=0.2), [str(source)], str(root / "data"))
    train = read_split(str(root / "data"), "train")
    texts = [text for r in train[:1500] for text in (r["anchor"], r["positive"])]
    models.build_tiny_model(texts, models.TinyModelOptions(), str(root / "tiny"))
    return root


@pytest.mark.slow
def test_training_on_scored_pairs_raises_held_out_spearman(sts, tmp_path):
    from sentence_transformers import SentenceTransformer

    cfg = config(**{**FAST, "model": str(sts / "tiny")})
    result = contrastive.run(cfg, str(sts / "data"), str(tmp_path / "out"))

    metrics = result.metrics
    assert metrics["train_pairs"] > 4000  # every scored training pair trains under cosent
    # the untrained encoder already ranks by word overlap; training has to beat it clearly
    assert metrics["eval_spearman"] > metrics["eval_spearman_initial"] + 0.05
    assert json.loads((tmp_path / "out/metrics.json").read_text()) == pytest.approx(metrics)

    # the saved encoder is a sentence-transformers folder that gives the same held-out number
    saved = SentenceTransformer(result.model_dir, device="cpu")
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "out/model").iterdir())
    rows = contrastive.load_text_pairs(str(sts / "data"), "eval")
    again = contrastive.evaluate_encoder(saved, rows, cfg)
    assert again["eval_spearman"] == pytest.approx(metrics["eval_spearman"], abs=1e-4)


@pytest.mark.slow
def test_a_sentence_transformers_model_trains_on_with_its_own_pooling(sts, tmp_path):
    # an embedding model is loaded as it is: a run from the first run's encoder (max pooling)
    # starts where that one ended, although this config's pooling (mean) would embed otherwise
    first = config(**{**FAST, "model": str(sts / "tiny"), "pooling": "max"})
    before = contrastive.run(first, str(sts / "data"), str(tmp_path / "first")).metrics
    second = config(**{**FAST, "model": str(tmp_path / "first"), "pooling": "mean"})
    after = contrastive.run(second, str(sts / "data"), str(tmp_path / "second")).metrics
    assert after["eval_spearman_initial"] == pytest.approx(before["eval_spearman"], abs=1e-4)
    assert after["eval_spearman"] != after["eval_spearman_initial"]


@pytest.mark.slow
def test_in_batch_negatives_raise_held_out_retrieval(sts, tmp_path):
    cfg = config(**{**FAST, "model": str(sts / "tiny"), "loss": "mnrl"})
    metrics = contrastive.run(cfg, str(sts / "data"), str(tmp_path / "out")).metrics
    # only the pairs scored 4 of 5 or above are positives
    assert 500 < metrics["train_pairs"] < 2000
    assert metrics["eval_mrr"] > metrics["eval_mrr_initial"] + 0.03
    assert metrics["eval_accuracy_at_1"] > metrics["eval_accuracy_at_1_initial"]


@pytest.mark.slow
def test_preference_pairs_train_a_lora_encoder_with_gradcache(sts, tmp_path):
    """Ingested preference pairs, the cached loss and a LoRA adapter merged at save."""
    from safetensors.torch import load_file

    from alignpipe import ingest

    source = tmp_path / "pairs.jsonl"
    colours = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
    with source.open("w") as f:
        for i, colour in enumerate(colours * 3):
            f.write(
                json.dumps(
                    {
                        "prompt": f"Question {i}: what colour is the {colour} car?",
                        "chosen": f"The car is {colour}.",
                        "rejected": f"A dog is playing in the park number {i}.",
                    }
                )
                + "\n"
            )
    ingest.run(ingest.IngestConfig(eval_fraction=0.3), [str(source)], str(tmp_path / "pairs"))

    cfg = config(
        model=str(sts / "tiny"),
        loss="cached_mnrl",
        mini_batch_size=4,
        peft={"method": "lora", "lora": {"r": 4}},
        training={**TRAINING, "max_steps": 3, "batch_size": 8, "learning_rate": 1e-2},
    )
    tracker = NullTracker()
    result = contrastive.run(cfg, str(tmp_path / "pairs"), str(tmp_path / "out"), tracker=tracker)

    # the cached (GradCache) loss trained, in mini-batches of 4 within batches of 8
    assert tracker.tags["alignpipe.contrastive_loss"] == "cached_mnrl"
    trainer = contrastive.build_trainer(
        cfg,
        contrastive.load_encoder(cfg),
        contrastive.training_set(
            contrastive.load_text_pairs(str(tmp_path / "pairs"), "train", NullTracker()),
            "cached_mnrl",
            cfg,
        ),
        "cached_mnrl",
        tmp_path / "inspect",
    )
    assert type(trainer.loss).__name__ == "CachedMultipleNegativesRankingLoss"
    assert trainer.loss.mini_batch_size == 4
    assert result.metrics["train_pairs"] >= 10
    assert {"eval_accuracy_at_1", "eval_mrr", "eval_mrr_initial"} <= set(result.metrics)
    assert "eval_spearman" not in result.metrics  # preference pairs carry no scores
    # the adapter is merged: a plain encoder whose attention weights moved off the base's
    out = tmp_path / "out/model"
    assert not (out / "adapter_config.json").exists()
    trained, base = load_file(out / "model.safetensors"), load_file(sts / "tiny/model.safetensors")
    key = "layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained[key], base[f"model.{key}"])
    assert torch.equal(trained["embed_tokens.weight"], base["model.embed_tokens.weight"])


@pytest.mark.slow
def test_a_rerun_resumes_a_lora_run_from_its_checkpoint(sts, tmp_path):
    cfg = config(
        model=str(sts / "tiny"),
        loss="mnrl",
        max_eval_pairs=100,
        peft={"method": "lora"},
        training={**TRAINING, "max_steps": 4, "save_steps": 2, "batch_size": 16},
    )
    first = contrastive.run(cfg, str(sts / "data"), str(tmp_path / "out"))
    assert first.metrics["eval_mrr"] != first.metrics["eval_mrr_initial"]
    # the rerun finds checkpoint-4 of 4 steps: nothing left to train, so its encoder is the
    # first run's, adapter weights and all (a lost adapter would score as the untrained one)
    again = contrastive.run(cfg, str(sts / "data"), str(tmp_path / "out"))
    assert again.metrics["resumed_from_step"] == 4.0
    assert again.metrics["eval_mrr"] == pytest.approx(first.metrics["eval_mrr"], abs=1e-6)


def test_the_cli_reports_bad_options_in_one_line(sts, tmp_path, capsys):
    from alignpipe.cli import main

    code = main(["contrastive", str(sts / "data"), "--output", str(tmp_path), "loss=triplet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "loss must be one of" in err
