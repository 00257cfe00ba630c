"""Read rows from the files people actually have: JSONL, JSON, CSV, TSV, Parquet and saved
``datasets`` folders, on a local path or an ``s3://`` URI.

A row that cannot be parsed comes back as a :class:`RawRow` with an ``error`` (it is quarantined,
never dropped); a file that cannot be read at all raises :class:`DataError`.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import logging
import math
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from alignpipe.errors import DataError
from alignpipe.storage import is_s3, local_path

log = logging.getLogger(__name__)

FILE_FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "datasets")
FORMAT_HINT = "pass --format jsonl|json|csv|tsv|parquet|datasets"

# A JSON document that is an object holding exactly one list of objects is a wrapper such as
# {"data": [...]}; but when that list sits under one of these keys, the object is itself a
# record (a one-line {"messages": [...]} file), not a wrapper.
_RECORD_LIST_KEYS = frozenset(
    {
        "messages",
        "conversations",
        "chosen",
        "rejected",
        "prompt",
        "completion",
        "preferred_output",
        "non_preferred_output",
        "history",
    }
)
_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_BATCH = 1024


@dataclass(frozen=True)
class RawRow:
    """One row as read from a file, before any layout is applied.

    Attributes:
        source: The URI or path the user gave.
        line: 1-based position: the physical line where the row starts for JSONL, CSV and TSV
            (blank lines count), the row index + 1 for JSON arrays, Parquet and datasets folders.
        data: The parsed row, or ``None`` when it could not be parsed.
        error: Why the row could not be parsed (it goes to quarantine), else ``None``.
    """

    source: str
    line: int
    data: dict[str, Any] | None
    error: str | None = None


def read_rows(uri: str, file_format: str | None = None) -> Iterator[RawRow]:
    """Yield every row of a file, folder or ``s3://`` URI.

    Rows are streamed: JSONL, CSV and TSV line by line, Parquet in record batches, datasets
    folders from their memory-mapped Arrow files. JSON documents are parsed whole.

    Per format, a row is:
    - jsonl: one JSON object per line (gzip-compressed files are recognised by their magic
      bytes); blank lines are skipped but counted.
    - json: an array of objects, or an object holding one list of objects (``{"data": [...]}``).
    - csv: a dict keyed by the header row; every value is a string.
    - tsv: headerless and unquoted (``csv.QUOTE_NONE``, as in the STS Benchmark files); each row
      is ``{"columns": [field, ...]}`` and layouts read it by position.
    - parquet: a dict per row.
    - datasets: a dict per row of a folder written by ``save_to_disk``. For a ``DatasetDict``
      the only split is used, or ``train`` when there are several (logged); point at
      ``<folder>/<split>`` to read another split.

    Args:
        uri: A local path or ``s3://bucket/key`` (an object, or a prefix for a datasets folder).
        file_format: One of ``FILE_FORMATS``; ``None`` detects it with :func:`detect_file_format`.
            This is the file format, not the layout of the rows.

    Yields:
        One :class:`RawRow` per row, with ``error`` set when the row cannot be parsed.

    Raises:
        DataError: The file is missing, empty, corrupt, or its format is unknown.
    """
    if file_format is not None and file_format not in FILE_FORMATS:
        raise DataError(f"unknown file format {file_format!r}; {FORMAT_HINT}")
    # Checked here so a missing local file is a data problem, like any other unusable input.
    if not is_s3(uri) and not Path(uri).exists():
        raise DataError(f"{uri} does not exist; check the path")
    with local_path(uri) as path:
        fmt = file_format or _detect(path, uri)
        log.info("reading %s as %s", uri, fmt)
        read = 0
        unreadable = 0
        for row in _READERS[fmt](path, uri):
            read += 1
            unreadable += row.error is not None
            yield row
        if read == 0:
            raise DataError(f"{uri} is empty (0 rows); check the export")
        log.info("read %d rows from %s (%d unreadable)", read, uri, unreadable)


def detect_file_format(path: str) -> str:
    """Tell the file format of a local path from its name, sniffing the content where needed.

    ``.jsonl``, ``.ndjson`` (and ``.gz`` of either) are JSONL. ``.json`` and ``.json.gz`` are a
    JSON document, unless the first line is a complete object and more lines follow (JSON Lines
    under a ``.json`` name, as many exports write). ``.csv`` is comma-separated with a header,
    unless its first line holds more tabs than commas: then it is headerless TSV (the STS
    Benchmark ships tab-separated ``.csv`` files). ``.tsv`` is TSV, ``.parquet``/``.pq``
    Parquet, and a folder written by ``save_to_disk`` is ``datasets``.

    Args:
        path: A local file or folder.

    Returns:
        One of ``FILE_FORMATS``.

    Raises:
        DataError: The path is missing or its format cannot be told.
    """
    local = Path(path)
    if not local.exists():
        raise DataError(f"{path} does not exist; check the path")
    return _detect(local, path)


def _detect(local: Path, shown: str) -> str:
    """Detect the format of ``local``; ``shown`` is the name used for the extension and errors."""
    if local.is_dir():
        if _is_saved_dataset(local):
            return "datasets"
        raise DataError(
            f"{shown} is a folder but not a saved datasets folder (no dataset_dict.json or "
            "state.json); pass a file, or write the folder with Dataset.save_to_disk"
        )
    name = shown.rstrip("/").rsplit("/", 1)[-1].lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")):
        return "jsonl"
    if name.endswith((".json", ".json.gz")):
        return _sniff_json(local)
    if name.endswith(".csv"):
        return _sniff_delimited(local)
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise DataError(f"cannot tell the format of {shown}; {FORMAT_HINT}")


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _sniff_json(path: Path) -> str:
    with _open_binary(path, str(path)) as f:
        # An array is told from its first byte, without reading a one-line document whole.
        if f.read(4096).lstrip(codecs.BOM_UTF8).lstrip().startswith(b"["):
            return "json"
        f.seek(0)
        first = next((raw for raw in f if raw.strip()), b"")
        rest = any(raw.strip() for raw in f)
    if not rest:
        return "json"
    try:
        return "jsonl" if isinstance(json.loads(first.lstrip(codecs.BOM_UTF8)), dict) else "json"
    except (json.JSONDecodeError, UnicodeDecodeError):
        # The first line is not a whole object: a pretty-printed document.
        return "json"


def _sniff_delimited(path: Path) -> str:
    with _open_binary(path, str(path)) as f:
        first = f.readline()
    return "tsv" if first.count(b"\t") > first.count(b",") else "csv"


@contextmanager
def _open_binary(path: Path, shown: str) -> Iterator[IO[bytes]]:
    """Open a file for reading bytes, decompressing gzip (recognised by its magic bytes)."""
    with path.open("rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        if magic != _GZIP_MAGIC:
            yield raw
            return
        try:
            with gzip.GzipFile(fileobj=raw) as unzipped:
                yield unzipped
        except (EOFError, gzip.BadGzipFile, zlib.error) as err:
            raise DataError(
                f"{shown} is not a readable gzip file ({err}); re-download or re-compress it"
            ) from None


def _lines(path: Path, shown: str) -> Iterator[tuple[int, str, str | None]]:
    """Yield ``(line number, text, decode error)`` for each physical line of a text file.

    A line that is not UTF-8 is yielded with an error (and its text decoded with surrogate
    escapes, so that a CSV reader can still find where the row ends).
    """
    with _open_binary(path, shown) as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                yield number, raw.decode("utf-8"), None
            except UnicodeDecodeError as err:
                yield number, raw.decode("utf-8", "surrogateescape"), _utf8_error(raw, err)


def _utf8_error(raw: bytes, err: UnicodeDecodeError) -> str:
    bad = " ".join(f"0x{b:02x}" for b in raw[err.start : err.end])
    return f"not valid UTF-8 (bytes {bad} at offset {err.start}); re-encode the file as UTF-8"


def _read_jsonl(path: Path, shown: str) -> Iterator[RawRow]:
    for number, text, error in _lines(path, shown):
        if error is None and not text.strip():
            continue
        if error is not None:
            yield RawRow(shown, number, None, error)
            continue
        try:
            # Without its line break, a cut-off line reads as unterminated, not as a control char.
            value = json.loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            yield RawRow(shown, number, None, f"invalid JSON at column {err.colno}: {err.msg}")
            continue
        if isinstance(value, dict):
            yield RawRow(shown, number, value)
        else:
            yield RawRow(shown, number, None, f"line is a JSON {_json_type(value)}, not an object")


def _read_json(path: Path, shown: str) -> Iterator[RawRow]:
    with _open_binary(path, shown) as f:
        raw = f.read()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        bad = " ".join(f"0x{b:02x}" for b in raw[err.start : err.end])
        raise DataError(
            f"{shown} is not valid UTF-8 (bytes {bad} at offset {err.start}, line {line}); "
            "re-encode the file as UTF-8"
        ) from None
    del raw
    if not text.strip():
        return
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{shown} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
            "fix the file, or pass --format jsonl if it holds one object per line"
        ) from None
    for index, item in enumerate(_json_records(document, shown), start=1):
        if isinstance(item, dict):
            yield RawRow(shown, index, item)
        else:
            yield RawRow(shown, index, None, f"item is a JSON {_json_type(item)}, not an object")


def _json_records(document: Any, shown: str) -> list[Any]:
    """The list of records in a JSON document: the array itself or the one list it wraps."""
    if isinstance(document, list):
        return document
    if not isinstance(document, dict):
        raise DataError(
            f"{shown} holds a JSON {_json_type(document)}; it must be an array of objects "
            'or an object holding one, like {"data": [...]}'
        )
    lists = [key for key, value in document.items() if isinstance(value, list)]
    wrappers = [
        key
        for key in lists
        if key not in _RECORD_LIST_KEYS and all(isinstance(v, dict) for v in document[key])
    ]
    if len(lists) == 1 and wrappers:
        return document[wrappers[0]]
    if len(wrappers) > 1 and len(wrappers) == len(lists):
        raise DataError(
            f"{shown} holds several lists of objects ({', '.join(wrappers)}); "
            "keep one list per file, or write the rows as JSONL"
        )
    # A single object with no wrapped list is one record.
    return [document]


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _read_csv(path: Path, shown: str) -> Iterator[RawRow]:
    # Model responses are often longer than the csv module's default 128 KiB field limit.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    decode_errors: dict[int, str] = {}

    def texts() -> Iterator[str]:
        for number, text, error in _lines(path, shown):
            if error is not None:
                decode_errors[number] = error
            yield text

    reader = csv.reader(texts())
    header: list[str] | None = None
    end = 0
    for fields in reader:
        start, end = end + 1, reader.line_num
        if not fields:
            continue
        error = next((decode_errors[n] for n in range(start, end + 1) if n in decode_errors), None)
        if header is None:
            if error is not None:
                raise DataError(f"{shown}: the header row is {error}")
            header = _check_header(fields, shown)
            continue
        if error is not None:
            yield RawRow(shown, start, None, error)
        elif len(fields) != len(header):
            yield RawRow(
                shown,
                start,
                None,
                f"row has {len(fields)} fields but the header has {len(header)}; "
                "check the quoting and delimiters of this row",
            )
        else:
            yield RawRow(shown, start, dict(zip(header, fields, strict=True)))


def _check_header(fields: list[str], shown: str) -> list[str]:
    """Return the header row, or raise when the first row cannot be one."""
    names = [name.strip() for name in fields]
    first = ", ".join(repr(n) for n in names[:4])
    if any(_is_number(name) for name in names):
        raise DataError(
            f"{shown} has no header row (its first row is {first}...); add a header row naming "
            "the columns, or pass --format tsv for headerless tab-separated files"
        )
    if "" in names:
        raise DataError(
            f"{shown}: column {names.index('') + 1} of the header row has no name; "
            "name every column in the first row"
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(
            f"{shown}: the header row names {', '.join(duplicates)} more than once; "
            "give every column a distinct name"
        )
    return names


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _read_tsv(path: Path, shown: str) -> Iterator[RawRow]:
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    for number, text, error in _lines(path, shown):
        if not text.strip():
            continue
        if error is not None:
            yield RawRow(shown, number, None, error)
            continue
        # No quoting: STS sentences contain bare quote characters that are data.
        fields = next(csv.reader([text.rstrip("\r\n")], delimiter="\t", quoting=csv.QUOTE_NONE))
        yield RawRow(shown, number, {"columns": fields})


def _read_parquet(path: Path, shown: str) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        raise DataError(f"{shown} is empty (0 bytes); check the export")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(
            f"{shown} is not a readable Parquet file ({err}); re-export it or check the download"
        ) from None
    index = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH):
        for row in batch.to_pylist():
            index += 1
            yield RawRow(shown, index, row)


def _read_datasets(path: Path, shown: str) -> Iterator[RawRow]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(
            f"{shown} is not a readable saved datasets folder ({err}); "
            "write it with Dataset.save_to_disk"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _pick_split(loaded, shown)
    for index, row in enumerate(loaded, start=1):
        yield RawRow(shown, index, dict(row))


def _pick_split(splits: Any, shown: str) -> Any:
    names = list(splits)
    if len(names) == 1:
        return splits[names[0]]
    if "train" in splits:
        log.info(
            "%s holds splits %s; reading 'train' (point at %s/<split> to read another)",
            shown,
            ", ".join(names),
            shown.rstrip("/"),
        )
        return splits["train"]
    raise DataError(
        f"{shown} holds splits {', '.join(names)} and no 'train'; "
        f"point at one of them, e.g. {shown.rstrip('/')}/{names[0]}"
    )


_READERS: dict[str, Callable[[Path, str], Iterator[RawRow]]] = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "tsv": _read_tsv,
    "parquet": _read_parquet,
    "datasets": _read_datasets,
}
