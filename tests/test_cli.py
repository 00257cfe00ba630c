"""The CLI boundary: counts on success, one-line errors and exit status 2 on bad input."""

import gzip
import json
import subprocess
import sys

import pytest

from alignpipe.cli import main, split_args


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, fragment):
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert fragment in lines[0], err


def test_prep_from_the_command_line_prints_counts(tmp_path, sample_data):
    src = sample_data / "gsm8k_chat_messages/chat_train.jsonl"
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "alignpipe.cli", "prep", str(src), "--output", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"] == 449 and stats["format"] == "openai_chat"
    expected = (
        f"prep: read 449, kept {stats['kept']} (train {stats['train']}, eval {stats['eval']})"
    )
    assert proc.stdout.startswith(expected)
    assert {p.name for p in out.iterdir()} >= {
        "train.parquet",
        "eval.parquet",
        "quarantine.jsonl",
        "stats.json",
    }


def test_ingest_with_format_map_and_overrides(tmp_path, capsys):
    src = tmp_path / "qa.csv"
    src.write_text("q,good,bad\nWhat is 2+2?,4,5\nName a fruit,apple,rock\nWho?,me,me\n")
    code, out, _ = run_cli(
        capsys,
        "ingest",
        str(src),
        "--output",
        str(tmp_path / "o"),
        "--format",
        "qa_pair",
        "--map",
        "prompt=q",
        "--map",
        "chosen=good",
        "--map",
        "rejected=bad",
        "eval_fraction=0",
    )
    assert code == 0
    assert out.startswith("ingest: read 3, kept 2 (train 2, eval 0), quarantined 1; format qa_pair")


def test_help_lists_the_stages(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "prep" in out and "ingest" in out


def test_options_lists_config_with_help(capsys):
    code, out, _ = run_cli(capsys, "options", "ingest")
    assert code == 0
    assert "min_score_gap (float, default 1.0):" in out


def test_truncated_and_wrongly_typed_lines_are_quarantined_not_fatal(tmp_path, capsys):
    src = tmp_path / "pairs.jsonl"
    src.write_text(
        '{"prompt": "a", "chosen": "x", "rejected": "y"}\n'
        '{"prompt": "b", "chosen": ["not", "a", "string"], "rejected": "y"}\n'
        '{"prompt": "c", "chosen": "x", "rej\n'
        '{"prompt": "d", "chosen": "x", "rejected": "z"}\n'
    )
    code, out, _ = run_cli(capsys, "ingest", str(src), "-o", str(tmp_path / "o"), "eval_fraction=0")
    assert code == 0
    assert "read 4, kept 2" in out and "quarantined 2" in out


def test_non_utf8_bytes_are_quarantined(tmp_path, capsys):
    src = tmp_path / "pairs.jsonl"
    good = b'{"prompt": "a", "chosen": "x", "rejected": "y"}\n'
    src.write_bytes(good + b'{"prompt": "\xff\xfe", "chosen": "x", "rejected": "y"}\n' + good)
    code, out, _ = run_cli(capsys, "ingest", str(src), "-o", str(tmp_path / "o"), "dedupe=false")
    assert code == 0
    assert "read 3, kept 2" in out
    entry = json.loads((tmp_path / "o/quarantine.jsonl").read_text().splitlines()[0])
    assert entry["line"] == 2 and "UTF-8" in entry["reason"]


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("empty.jsonl", b"", "empty"),
        ("zero.parquet", b"", "parquet"),
        ("broken.parquet", b"PAR1 not really", "parquet"),
        ("data.xyz", b"hello", "--format"),
        ("cols.jsonl", b'{"foo": 1, "bar": 2}\n', "--format"),
        ("broken.json", b'[{"prompt": "a",', "JSON"),
    ],
)
def test_unusable_files_give_one_line_errors(tmp_path, capsys, name, content, fragment):
    src = tmp_path / name
    src.write_bytes(content)
    code, _, err = run_cli(capsys, "ingest", str(src), "-o", str(tmp_path / "o"))
    assert_one_line_error(code, err, fragment)


def test_gzip_input_and_missing_file(tmp_path, capsys):
    src = tmp_path / "pairs.jsonl.gz"
    with gzip.open(src, "wt") as fh:
        fh.write('{"prompt": "a", "chosen": "x", "rejected": "y"}\n')
    code, out, _ = run_cli(capsys, "ingest", str(src), "-o", str(tmp_path / "o"))
    assert code == 0 and "read 1, kept 1" in out
    code, _, err = run_cli(capsys, "ingest", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path))
    assert_one_line_error(code, err, "nope.jsonl")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["ingest", "IN", "-o", "OUT", "eval_fraction=2"], "eval_fraction must be in [0, 1)"),
        (["ingest", "IN", "-o", "OUT", "stepz=1"], "unknown option stepz"),
        (["ingest", "IN", "-o", "OUT", "--format", "nope"], "unknown format 'nope'"),
        (["ingest", "IN", "-o", "OUT", "--config", "missing.yaml"], "does not exist"),
        (["ingest", "IN", "-o", "OUT", "--map", "prompt"], "FIELD=COLUMN"),
        (["ingest", "IN"], "--output"),
        (["ingest", "-o", "OUT"], "needs at least one input"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_usage_exits_2_with_one_line(tmp_path, capsys, argv, fragment):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a", "chosen": "x", "rejected": "y"}\n')
    argv = [str(src) if a == "IN" else str(tmp_path / "o") if a == "OUT" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert_one_line_error(code, err, fragment)


def test_split_args_tells_inputs_from_overrides(tmp_path):
    odd = tmp_path / "a=b.jsonl"
    odd.write_text("")
    inputs, overrides = split_args(["x.jsonl", "seed=3", "lora.r=4", str(odd), "s3://b/k=v"])
    assert inputs == ["x.jsonl", str(odd), "s3://b/k=v"]
    assert overrides == ["seed=3", "lora.r=4"]


def test_synth_then_tiny_model_then_ingest(tmp_path, capsys):
    code, out, _ = run_cli(
        capsys, "synth", "-o", str(tmp_path / "task"), "num_sft=50", "num_pairs=20"
    )
    assert code == 0 and "votes.jsonl" in out
    votes = tmp_path / "task/votes.jsonl"
    assert len(votes.read_text().splitlines()) == 20 * 3  # three annotators by default
    corpus = tmp_path / "task/sft.jsonl"
    code, out, _ = run_cli(
        capsys, "tiny-model", str(corpus), "-o", str(tmp_path / "m"), "num_layers=1"
    )
    assert code == 0 and out.startswith("tiny-model:")
    assert (tmp_path / "m/model.safetensors").exists()
    code, out, _ = run_cli(
        capsys, "ingest", str(votes), "-o", str(tmp_path / "p"), f"tokenizer={tmp_path / 'm'}"
    )
    assert code == 0 and "format votes" in out
    stats = json.loads((tmp_path / "p/stats.json").read_text())
    assert stats["token_checks"] == "chat template and length"
    assert stats["judgements"] == 60
