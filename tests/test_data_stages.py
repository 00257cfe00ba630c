"""The prep and ingest stages end to end: accounting, splits, quarantine reasons and outputs."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignpipe import ingest, prep
from alignpipe.config import load_config
from alignpipe.data.build import assign_split, read_split
from alignpipe.errors import ConfigError, DataError
from alignpipe.tracking import NullTracker


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def stats_of(folder):
    return json.loads((folder / "stats.json").read_text())


def quarantine_of(folder):
    return [json.loads(line) for line in (folder / "quarantine.jsonl").read_text().splitlines()]


def test_prep_alpaca_sample_accounts_for_every_row(sample_data, tmp_path):
    out = tmp_path / "out"
    result = prep.run(
        prep.PrepConfig(), [str(sample_data / "alpaca_llamafactory/alpaca_en_demo.json")], str(out)
    )
    stats = stats_of(out)
    assert stats["format"] == "alpaca"
    assert stats["read"] == 999
    assert stats["read"] == stats["kept"] + stats["quarantined"]
    assert stats["train"] + stats["eval"] == stats["kept"]
    assert len(quarantine_of(out)) == stats["quarantined"]
    # the split holds out roughly eval_fraction of prompts
    assert 0.05 < stats["eval"] / stats["kept"] < 0.15
    train = read_split(str(out), "train")
    assert len(train) == stats["train"] == len(result.train)
    assert {m["role"] for r in train for m in r["messages"]} <= {"user", "assistant", "system"}
    assert pq.read_table(out / "eval.parquet").num_rows == stats["eval"]


def test_ingest_hh_rlhf_sample(sample_data, tmp_path):
    out = tmp_path / "hh"
    ingest.run(
        ingest.IngestConfig(),
        [str(sample_data / "hh_rlhf_harmless_base/sample.jsonl.gz")],
        str(out),
    )
    stats = stats_of(out)
    assert stats["format"] == "hh_rlhf"
    assert stats["read"] == 1500
    assert stats["read"] == stats["kept"] + stats["quarantined"]
    reasons = {q["check"] for q in quarantine_of(out)}
    assert reasons <= {"invalid", "structure", "duplicate", "unreadable", "leakage"}
    records = read_split(str(out), "train") + read_split(str(out), "eval")
    first = next(r for r in records if r["prompt"][0]["content"].startswith("what are some pranks"))
    assert first["prompt"][-1]["role"] == "user"
    assert first["chosen"][0]["role"] == "assistant"
    assert first["chosen"] != first["rejected"]


def test_ingest_openai_preference_sample(sample_data, tmp_path):
    out = tmp_path / "orca"
    path = sample_data / "orca_dpo_pairs_openai_format/validation.jsonl"
    ingest.run(ingest.IngestConfig(), [str(path)], str(out))
    stats = stats_of(out)
    assert (stats["format"], stats["read"]) == ("openai_preference", 284)
    assert stats["read"] == stats["kept"] + stats["quarantined"]
    records = read_split(str(out), "train") + read_split(str(out), "eval")
    assert all(r["prompt"][0]["role"] == "system" for r in records)


def test_quarantine_reasons_and_duplicates(tmp_path):
    good = {"prompt": "Name a fruit.", "chosen": "apple.", "rejected": "rock."}
    rows = [
        good,
        {"prompt": "Name a color.", "chosen": "red.", "rejected": "red."},  # identical
        {"prompt": "Name a tool.", "chosen": "", "rejected": "spoon."},  # empty chosen
        good,  # duplicate of line 1
        {"prompt": "Name a car.", "chosen": "volvo.", "rejected": "apple."},
    ]
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with open(src, "a") as fh:
        fh.write('{"prompt": "truncated", "chos\n')  # line 6
    cfg = load_config(ingest.IngestConfig, None, ["eval_fraction=0", "min_kept_fraction=0.2"])
    ingest.run(cfg, [src], str(tmp_path / "out"))
    stats = stats_of(tmp_path / "out")
    assert (stats["read"], stats["kept"], stats["quarantined"]) == (6, 2, 4)
    by_line = {q["line"]: q for q in quarantine_of(tmp_path / "out")}
    assert by_line[2]["reason"] == "chosen and rejected are identical"
    assert by_line[3]["check"] == "invalid"
    assert by_line[4]["reason"] == "duplicate of line 1"
    assert by_line[6]["check"] == "unreadable"
    assert stats["reasons"] == {"structure": 1, "invalid": 1, "duplicate": 1, "unreadable": 1}


def test_kept_floor_fails_with_a_clear_message(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "same", "rejected": "same"} for i in range(4)]
    rows.append({"prompt": "p", "chosen": "a", "rejected": "b"})
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError, match=r"only 1 of 5 rows \(20%\).*min_kept_fraction"):
        ingest.run(ingest.IngestConfig(), [src], str(tmp_path / "out"))


def test_split_is_by_prompt_and_independent_of_row_order(tmp_path):
    rows = [
        {"prompt": f"question {i // 2}", "chosen": f"good {i}", "rejected": f"bad {i}"}
        for i in range(200)
    ]
    cfg = load_config(ingest.IngestConfig, None, ["eval_fraction=0.3", "seed=7"])
    a = ingest.run(cfg, [write_jsonl(tmp_path / "a.jsonl", rows)], str(tmp_path / "a"))
    b = ingest.run(cfg, [write_jsonl(tmp_path / "b.jsonl", rows[::-1])], str(tmp_path / "b"))

    def prompts(records):
        return {r["prompt"][0]["content"] for r in records}

    assert prompts(a.eval) == prompts(b.eval)
    assert not prompts(a.eval) & prompts(a.train)  # both pairs of a prompt stay together
    expected = {
        f"question {i}"
        for i in range(100)
        if assign_split(f"user\x1fquestion {i}", 7, 0.3) == "eval"
    }
    assert prompts(a.eval) == expected


def test_explicit_eval_inputs_are_checked_for_leakage(tmp_path):
    train = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(5)]
    eval_rows = [
        {"prompt": "q1", "chosen": "sure", "rejected": "nope"},  # prompt seen in training
        {"prompt": "q9", "chosen": "sure", "rejected": "nope"},
    ]
    cfg = load_config(
        ingest.IngestConfig, None, {"eval_inputs": [write_jsonl(tmp_path / "e.jsonl", eval_rows)]}
    )
    result = ingest.run(cfg, [write_jsonl(tmp_path / "t.jsonl", train)], str(tmp_path / "out"))
    assert (len(result.train), len(result.eval)) == (5, 1)
    leaked = [q for q in quarantine_of(tmp_path / "out") if q["check"] == "leakage"]
    assert [(q["line"], q["source"].endswith("e.jsonl")) for q in leaked] == [(1, True)]


def test_prep_turns_preference_pairs_into_chosen_conversations(tmp_path):
    rows = [{"prompt": "Name a fruit.", "chosen": "apple.", "rejected": "rock."}]
    cfg = load_config(prep.PrepConfig, None, ["eval_fraction=0", "task=fruit"])
    result = prep.run(cfg, [write_jsonl(tmp_path / "p.jsonl", rows)], str(tmp_path / "out"))
    assert result.train == [
        {
            "messages": [
                {"role": "user", "content": "Name a fruit."},
                {"role": "assistant", "content": "apple."},
            ],
            "task": "fruit",
        }
    ]


def test_ingest_rejects_conversation_data_naming_the_other_stage(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ]
    with pytest.raises(DataError, match="use the other data stage"):
        ingest.run(
            ingest.IngestConfig(), [write_jsonl(tmp_path / "c.jsonl", rows)], str(tmp_path / "o")
        )


def test_votes_export_reduces_to_pairs_with_agreement(tmp_path):
    def vote(item, who, choice):
        return {
            "item_id": item,
            "prompt": f"Name {item}.",
            "response_a": "good answer.",
            "response_b": "bad answer.",
            "choice": choice,
            "annotator": who,
        }

    rows = [vote("x", "ann1", "a"), vote("x", "ann2", "a"), vote("x", "ann3", "b")]
    rows += [vote("y", "ann1", "a"), vote("y", "ann2", "b")]  # a tie: dropped and counted
    rows += [vote("z", "ann1", "b"), vote("z", "ann2", "b")]
    cfg = load_config(ingest.IngestConfig, None, ["eval_fraction=0", "min_kept_fraction=0"])
    result = ingest.run(cfg, [write_jsonl(tmp_path / "v.jsonl", rows)], str(tmp_path / "out"))
    stats = result.stats
    assert stats["format"] == "votes"
    assert stats["judgements"] == 7
    assert (stats["read"], stats["kept"], stats["quarantined"]) == (3, 2, 1)
    by_prompt = {r["prompt"][0]["content"]: r for r in result.train}
    assert by_prompt["Name x."]["chosen"][0]["content"] == "good answer."
    assert by_prompt["Name x."]["margin"] == pytest.approx(1 / 3)
    assert by_prompt["Name z."]["chosen"][0]["content"] == "bad answer."
    [tie] = quarantine_of(tmp_path / "out")
    assert tie["lines"] == [4, 5]
    assert "agreement" in stats


def test_tokenizer_checks_template_and_length(tmp_path, tiny_tokenizer_dir):
    rows = [
        {"prompt": "Name a fruit.", "chosen": "apple.", "rejected": "rock."},
        {"prompt": "Name a fruit.", "chosen": "apple " * 80, "rejected": "rock."},
    ]
    cfg = load_config(
        ingest.IngestConfig,
        None,
        {"tokenizer": str(tiny_tokenizer_dir), "max_length": 64, "eval_fraction": 0.0},
    )
    result = ingest.run(cfg, [write_jsonl(tmp_path / "p.jsonl", rows)], str(tmp_path / "out"))
    assert result.stats["token_checks"] == "chat template and length"
    [too_long] = quarantine_of(tmp_path / "out")
    assert too_long["check"] == "length" and too_long["line"] == 2
    assert result.stats["lengths"]["tokens"]["count"] == 1


def test_max_length_without_tokenizer_is_a_config_error():
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        load_config(prep.PrepConfig, None, ["max_length=10"])


def test_stage_logs_params_metrics_and_datasets(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(10)]
    tracker = NullTracker()
    ingest.run(
        ingest.IngestConfig(),
        [write_jsonl(tmp_path / "t.jsonl", rows)],
        str(tmp_path / "o"),
        tracker,
    )
    assert tracker.params["eval_fraction"] == "0.1"
    logged = {key: value for key, value, _ in tracker.metrics}
    assert logged["read"] == 10.0 and logged["kept"] == 10.0
    assert {d["context"] for d in tracker.datasets} == {"train", "eval"}


@pytest.mark.integration
def test_ingest_reads_and_writes_s3(s3_env, sample_data):
    from alignpipe import storage

    src = f"{s3_env}/raw/orca.jsonl"
    storage.upload(sample_data / "orca_dpo_pairs_openai_format/validation.jsonl", src)
    result = ingest.run(ingest.IngestConfig(), [src], f"{s3_env}/prepared")
    stats = json.loads(storage.read_text(f"{s3_env}/prepared/stats.json"))
    assert stats == result.stats
    assert stats["read"] == 284 == stats["kept"] + stats["quarantined"]
    assert read_split(f"{s3_env}/prepared", "train") == result.train
    assert storage.list_files(f"{s3_env}/prepared") == [
        f"{s3_env}/prepared/{name}"
        for name in ("eval.parquet", "quarantine.jsonl", "stats.json", "train.parquet")
    ]


def test_a_stage_reads_a_split_with_its_fingerprint_or_says_which_folder_it_wants(tmp_path):
    from alignpipe.data.build import read_stage_split, split_uri
    from alignpipe.tracking import fingerprint_file

    folder = tmp_path / "pairs"
    folder.mkdir()
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "p", "chosen": "a", "rejected": "b"}]),
        folder / "train.parquet",
    )
    records, digest = read_stage_split(str(folder), "train", "give it the ingest output")
    assert records == [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    assert digest == fingerprint_file(folder / "train.parquet")
    assert split_uri(f"{folder}/", "train") == f"{folder}/train.parquet"
    with pytest.raises(DataError, match=r"holds no eval\.parquet; give it the ingest output$"):
        read_stage_split(str(folder), "eval", "give it the ingest output")


@pytest.mark.parametrize("stage", ["dpo", "reward_model", "ppo", "sft", "contrastive"])
def test_training_stages_name_the_folder_they_want_when_a_split_is_missing(tmp_path, stage):
    import importlib

    module = importlib.import_module(f"alignpipe.{stage}")
    loader = {
        "dpo": "load_pairs",
        "reward_model": "load_pairs",
        "ppo": "load_prompts",
        "sft": "load_conversations",
        "contrastive": "load_text_pairs",
    }[stage]
    with pytest.raises(DataError, match=f"holds no train.parquet; give {stage} the output folder"):
        getattr(module, loader)(str(tmp_path), "train")
