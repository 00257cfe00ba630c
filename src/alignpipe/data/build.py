"""The steps data prep and preference ingest share: validate, split, count, write.

A stage hands over normalized candidates and the quarantine entries of rows that could not be
parsed; this module decides the rest and writes ``train.parquet``, ``eval.parquet``,
``quarantine.jsonl`` and ``stats.json`` so that ``read = kept + quarantined`` always holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignpipe import storage
from alignpipe.config import option
from alignpipe.data.records import Shape, arrow_schema, complete, prompt_key
from alignpipe.data.validate import Candidate, Quarantined, remove_leakage, validate
from alignpipe.errors import ConfigError, DataError

log = logging.getLogger(__name__)

OUTPUT_FILES = ("train.parquet", "eval.parquet", "quarantine.jsonl", "stats.json")


@dataclass
class DataOptions:
    """Options every data stage shares."""

    format: str | None = option(
        None, help="Layout of the input (e.g. hh_rlhf, alpaca, openai_chat); unset = auto-detect."
    )
    file_format: str | None = option(
        None, help="File format (jsonl, json, csv, tsv, parquet, datasets); unset = from the name."
    )
    mapping: dict[str, str] = option(
        default_factory=dict,
        help="Column mapping FIELD=COLUMN: read the layout's FIELD from the input's COLUMN.",
    )
    eval_inputs: list[str] = option(
        default_factory=list,
        help="Inputs that form the eval split as given; unset = split off eval_fraction.",
    )
    eval_fraction: float = option(
        0.1, help="Share of prompts held out for evaluation when eval_inputs is unset."
    )
    seed: int = option(0, help="Seed of the deterministic train/eval split.")
    tokenizer: str | None = option(
        None,
        help="Model reference whose tokenizer measures lengths and checks the chat template; "
        "unset = skip token checks.",
    )
    max_length: int | None = option(
        None, help="Quarantine rows longer than this many tokens (needs tokenizer)."
    )
    dedupe: bool = option(True, help="Quarantine exact duplicates (the first one is kept).")
    min_kept_fraction: float = option(
        0.5, help="Fail the stage when fewer than this share of records is kept."
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(
                f"eval_fraction must be in [0, 1), got {self.eval_fraction}; 0.1 holds out 10%"
            )
        if not 0.0 <= self.min_kept_fraction <= 1.0:
            raise ConfigError(
                f"min_kept_fraction must be in [0, 1], got {self.min_kept_fraction}; "
                "0 disables the floor"
            )
        if self.max_length is not None and self.max_length <= 0:
            raise ConfigError(f"max_length must be positive, got {self.max_length}")
        if self.max_length is not None and self.tokenizer is None:
            raise ConfigError(
                "max_length counts tokens and needs a tokenizer; set tokenizer=<model ref>"
            )


@dataclass
class DataResult:
    """What a data stage produced: the splits, the quarantine and the stats."""

    shape: Shape
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    quarantined: list[Quarantined]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        """The counts, and inter-annotator agreement when there is one, as flat metrics."""
        counts = ("read", "kept", "quarantined", "train", "eval")
        metrics = {key: float(self.stats[key]) for key in counts}
        for key, value in (self.stats.get("agreement") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"agreement_{key}"] = float(value)
        return metrics


def assign_split(key: str, seed: int, eval_fraction: float) -> str:
    """Return "eval" or "train" for a prompt key; stable across runs, machines and orderings."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    return "eval" if bucket < eval_fraction else "train"


def build(
    shape: Shape,
    train_candidates: Sequence[Candidate],
    eval_candidates: Sequence[Candidate] | None,
    unparsed: Sequence[Quarantined],
    options: DataOptions,
    *,
    tokenizer: Any = None,
    layout: str,
    extra_stats: dict[str, Any] | None = None,
) -> DataResult:
    """Validate candidates, split them, and count everything; fail under the kept floor."""
    checked = validate(
        [*train_candidates, *(eval_candidates or [])],
        shape,
        tokenizer=tokenizer,
        max_length=options.max_length,
        dedupe=options.dedupe,
    )
    if eval_candidates is None:
        sides = {"train": [], "eval": []}
        for cand in checked.kept:
            split = assign_split(
                prompt_key(cand.record, shape), options.seed, options.eval_fraction
            )
            sides[split].append(cand)
        train, eval_ = sides["train"], sides["eval"]
    else:
        eval_ids = {id(c) for c in eval_candidates}
        train = [c for c in checked.kept if id(c) not in eval_ids]
        eval_ = [c for c in checked.kept if id(c) in eval_ids]
    # Splitting by prompt cannot leak; explicit eval inputs can, so the check always runs.
    eval_, leaked = remove_leakage(train, eval_, shape)

    quarantined = [*unparsed, *checked.quarantined, *leaked]
    read = len(train_candidates) + len(eval_candidates or []) + len(unparsed)
    kept = len(train) + len(eval_)
    stats = {
        "format": layout,
        "shape": shape,
        "read": read,
        "kept": kept,
        "quarantined": len(quarantined),
        "train": len(train),
        "eval": len(eval_),
        "reasons": dict(Counter(q.check for q in quarantined).most_common()),
        "lengths": length_stats(checked.token_lengths, [c.record for c in train + eval_], shape),
        "token_checks": "chat template and length" if tokenizer is not None else "skipped",
    }
    stats |= {k: v for k, v in (extra_stats or {}).items() if k not in stats}
    if read != kept + len(quarantined):  # a bug in this module, not bad input
        raise RuntimeError(f"row accounting broke: read {read} != kept {kept} + quarantined")
    if read == 0:
        raise DataError("the inputs hold no rows; check the paths and the export")
    if kept / read < options.min_kept_fraction:
        raise DataError(
            f"only {kept} of {read} rows ({kept / read:.0%}) passed validation, under "
            f"min_kept_fraction={options.min_kept_fraction}; read the reasons in quarantine.jsonl "
            f"({stats['reasons']}) or lower the floor"
        )
    return DataResult(
        shape,
        [c.record for c in train],
        [c.record for c in eval_],
        quarantined,
        stats,
    )


def length_stats(token_lengths: list[int], records: list[dict], shape: Shape) -> dict[str, Any]:
    """Summaries of record lengths in tokens (when measured) and characters."""
    chars = [len(json.dumps(_text_fields(r, shape), ensure_ascii=False)) for r in records]
    out = {"chars": _summary(chars)}
    if token_lengths:
        out["tokens"] = _summary(token_lengths)
    return out


def write(result: DataResult, output: str) -> dict[str, str]:
    """Write the four output files under a local folder or ``s3://`` prefix."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema(result.shape)
    with storage.output_path(output) as folder:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, rows in (("train", result.train), ("eval", result.eval)):
            rows = [complete(r, result.shape) for r in rows]
            table = pa.Table.from_pylist(rows, schema=schema)
            pq.write_table(table, folder / f"{name}.parquet")
        with open(folder / "quarantine.jsonl", "w", encoding="utf-8") as fh:
            for entry in result.quarantined:
                fh.write(json.dumps(entry.to_json(), ensure_ascii=False, default=str) + "\n")
        (folder / "stats.json").write_text(json.dumps(result.stats, indent=2) + "\n")
        digests = {
            name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in OUTPUT_FILES
        }
    return {f"{output.rstrip('/')}/{name}": digests[name] for name in OUTPUT_FILES}


def log_result(tracker: Any, result: DataResult, files: dict[str, str]) -> None:
    """Log a data stage's counts as metrics, its stats as a file and its splits as datasets."""
    numeric = {k: v for k, v in result.stats.items() if isinstance(v, (int, float))}
    metrics = {**{k: float(v) for k, v in numeric.items()}, **result.metrics}
    for kind, summary in result.stats.get("lengths", {}).items():
        for name, value in summary.items():
            metrics[f"length_{kind}_{name}"] = float(value)
    tracker.log_metrics(metrics)
    tracker.log_dict(result.stats, "stats.json")
    for uri, digest in files.items():
        split = uri.rsplit("/", 1)[-1].removesuffix(".parquet")
        if split in ("train", "eval"):
            rows = len(result.train if split == "train" else result.eval)
            tracker.log_dataset(f"{result.shape}-{split}", uri, digest, split, num_rows=rows)


def load_tokenizer(ref: str | None) -> Any:
    """Load the tokenizer of a model reference, or None when no reference is given."""
    if ref is None:
        return None
    from alignpipe import models

    return models.load_tokenizer(models.resolve_model(ref))


def read_split(folder: str, split: str = "train") -> list[dict[str, Any]]:
    """Read back one split written by :func:`write` as a list of records."""
    import pyarrow.parquet as pq

    with storage.local_path(f"{folder.rstrip('/')}/{split}.parquet") as path:
        return pq.read_table(path).to_pylist()


def read_stage_split(data: str, split: str, missing: str) -> tuple[list[dict[str, Any]], str]:
    """The records of one split of a stage's data folder, and the split file's fingerprint.

    One download of ``data`` (a folder or ``s3://`` prefix) serves both. ``missing`` finishes
    the error for a folder without the split: what the stage wants instead.
    """
    from alignpipe.tracking import fingerprint_file

    with storage.local_path(data) as folder:
        path = Path(folder) / f"{split}.parquet"
        if not path.is_file():
            raise DataError(f"{data} holds no {split}.parquet; {missing}")
        return read_split(str(folder), split), fingerprint_file(path)


def split_uri(data: str, split: str) -> str:
    """Where a split lives, as logged with its fingerprint (the folder as given, not a copy)."""
    return f"{data.rstrip('/')}/{split}.parquet"


def _text_fields(record: dict, shape: Shape) -> list:
    fields = {
        "conversation": ("messages",),
        "preference": ("prompt", "chosen", "rejected"),
        "feedback": ("prompt", "completion"),
        "text_pair": ("anchor", "positive", "negative"),
    }[shape]
    return [record.get(f) for f in fields]


def _summary(values: list[int]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "count": len(ordered),
        "mean": round(sum(ordered) / len(ordered), 2),
        "p50": pct(0.5),
        "p95": pct(0.95),
        "max": ordered[-1],
    }


def collect(
    inputs: Sequence[str], options: DataOptions, shapes: Sequence[Shape]
) -> tuple[str, Shape, list[Candidate], list[Quarantined]]:
    """Read inputs, pick the layout (given or detected) and normalize every row.

    Returns the layout name, the shape it produces, the normalized candidates and quarantine
    entries for rows that could not be parsed or normalized. All inputs must share one layout.
    """
    from alignpipe.data.layouts import (
        LAYOUTS,
        RowError,
        detect_layout,
        normalize,
        resolve_layout,
    )
    from alignpipe.data.readers import read_rows

    if not inputs:
        raise ConfigError("no input given; pass one or more files, folders or s3:// URIs")
    given = _layout_named(options.format, LAYOUTS) if options.format else None
    names: list[str] = []
    shape: Shape | None = None
    candidates: list[Candidate] = []
    unparsed: list[Quarantined] = []
    for uri in inputs:
        rows = read_rows(uri, options.file_format)
        layout = given
        if layout is None:
            head, rows = _peek(rows, 20)
            layout = detect_layout([r.data for r in head if r.data is not None], options.mapping)
            log.info("detected layout %s in %s", layout.name, uri)
        layout = resolve_layout(layout, options.mapping)
        if shape is not None and layout.shape != shape:
            raise DataError(
                f"{uri} holds {layout.shape} records but earlier inputs hold {shape} records; "
                "run the stage once per kind of data"
            )
        shape = layout.shape
        if layout.name not in names:
            names.append(layout.name)
        if layout.shape not in shapes:
            raise DataError(
                f"{uri} has the {layout.name} layout ({layout.shape} records); this stage takes "
                f"{' or '.join(shapes)} data; use the other data stage or pass --format"
            )
        for row in rows:
            if row.error is not None:
                unparsed.append(Quarantined(row.source, [row.line], "unreadable", row.error))
                continue
            try:
                records = normalize(row.data, layout, options.mapping)
            except RowError as err:
                unparsed.append(Quarantined(row.source, [row.line], "invalid", str(err), row.data))
                continue
            candidates.extend(Candidate(rec, row.source, [row.line]) for rec in records)
    return "+".join(names), shape, candidates, unparsed


def _layout_named(name: str, layouts: dict) -> Any:
    if name not in layouts:
        raise ConfigError(f"unknown format {name!r}; choose one of {', '.join(sorted(layouts))}")
    return layouts[name]


def _peek(rows, n: int):
    """Return the first n rows and an iterator that still yields every row."""
    import itertools

    head = list(itertools.islice(rows, n))
    return head, itertools.chain(head, rows)
