"""Tests of the file readers: every format, line numbers, row errors and whole-file errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignpipe.data.readers import RawRow, detect_file_format, read_rows
from alignpipe.errors import DataError


def write(path: Path, text: str | bytes) -> str:
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return str(path)


# JSONL


def test_jsonl_rows_and_line_numbers_count_blank_lines(tmp_path):
    path = write(tmp_path / "rows.jsonl", '{"a": 1}\n\n{"a": 2}\n   \n{"a": 3}\n')

    rows = list(read_rows(path))

    assert rows == [
        RawRow(path, 1, {"a": 1}),
        RawRow(path, 3, {"a": 2}),
        RawRow(path, 5, {"a": 3}),
    ]


def test_jsonl_without_trailing_newline_and_with_crlf(tmp_path):
    path = write(tmp_path / "rows.jsonl", '{"a": "x"}\r\n{"a": "y"}')

    assert [(r.line, r.data) for r in read_rows(path)] == [(1, {"a": "x"}), (2, {"a": "y"})]


@pytest.mark.parametrize("name", ["rows.jsonl.gz", "rows.json.gz"])
def test_gzip_jsonl(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(gzip.compress(b'{"q": "one"}\n{"q": "two"}\n\n{"q": "three"}\n'))

    assert detect_file_format(str(path)) == "jsonl"
    rows = list(read_rows(str(path)))
    assert [(r.line, r.data["q"]) for r in rows] == [(1, "one"), (2, "two"), (4, "three")]


def test_truncated_gzip_is_a_data_error(tmp_path):
    whole = gzip.compress(b"".join(b'{"i": %d}\n' % i for i in range(2000)))
    path = write(tmp_path / "cut.jsonl.gz", whole[: len(whole) // 2])

    with pytest.raises(DataError, match="not a readable gzip file"):
        list(read_rows(path))


def test_corrupt_gzip_is_a_data_error(tmp_path):
    data = bytearray(gzip.compress(b"".join(b'{"row": %d}\n' % i for i in range(5000))))
    data[100:140] = bytes(40)
    path = write(tmp_path / "bad.jsonl.gz", bytes(data))

    with pytest.raises(DataError, match="not a readable gzip file"):
        list(read_rows(path))


def test_truncated_json_line_is_a_row_error_and_the_other_rows_are_fine(tmp_path):
    path = write(tmp_path / "rows.jsonl", '{"a": 1}\n{"a": "unfinished\n\n{"a": 3}\n')

    rows = list(read_rows(path))

    assert [r.line for r in rows] == [1, 2, 4]
    assert rows[0].data == {"a": 1} and rows[0].error is None
    assert rows[1].data is None
    # column 7 is where the unterminated string starts
    assert rows[1].error == "invalid JSON at column 7: Unterminated string starting at"
    assert rows[2].data == {"a": 3} and rows[2].error is None


def test_json_line_that_is_not_an_object_is_a_row_error(tmp_path):
    path = write(tmp_path / "rows.jsonl", '[1, 2]\n"text"\n{"ok": true}\n')

    rows = list(read_rows(path))

    assert [r.error for r in rows] == [
        "line is a JSON array, not an object",
        "line is a JSON string, not an object",
        None,
    ]
    assert rows[2].data == {"ok": True}


def test_non_utf8_line_is_a_row_error_naming_bytes_and_fix(tmp_path):
    path = write(tmp_path / "rows.jsonl", b'{"a": "ok"}\n{"a": "caf\xe9"}\n{"a": "fine"}\n')

    rows = list(read_rows(path))

    assert rows[1].line == 2 and rows[1].data is None
    # b'{"a": "caf' is 10 bytes, so the bad byte sits at offset 10 of the line
    assert rows[1].error == (
        "not valid UTF-8 (bytes 0xe9 at offset 10); re-encode the file as UTF-8"
    )
    assert rows[0].data == {"a": "ok"} and rows[2].data == {"a": "fine"}


def test_utf8_bom_is_ignored(tmp_path):
    path = write(tmp_path / "rows.jsonl", b'\xef\xbb\xbf{"a": 1}\n')

    assert [r.data for r in read_rows(path)] == [{"a": 1}]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_jsonl_is_a_data_error(tmp_path, content):
    path = write(tmp_path / "empty.jsonl", content)

    with pytest.raises(DataError, match=r"empty\.jsonl is empty \(0 rows\); check the export"):
        list(read_rows(path))


# JSON documents


def test_json_array_lines_are_item_positions(tmp_path):
    path = write(tmp_path / "rows.json", json.dumps([{"a": 1}, 7, {"a": 3}], indent=2))

    rows = list(read_rows(path))

    assert detect_file_format(path) == "json"
    assert [(r.line, r.data, r.error) for r in rows] == [
        (1, {"a": 1}, None),
        (2, None, "item is a JSON number, not an object"),
        (3, {"a": 3}, None),
    ]


def test_json_object_wrapping_one_list(tmp_path):
    path = write(
        tmp_path / "rows.json", json.dumps({"version": 2, "data": [{"x": "a"}, {"x": "b"}]})
    )

    assert [(r.line, r.data) for r in read_rows(path)] == [(1, {"x": "a"}), (2, {"x": "b"})]


def test_json_object_with_a_message_list_is_one_record(tmp_path):
    record = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    }
    path = write(tmp_path / "one.json", json.dumps(record))

    assert [(r.line, r.data) for r in read_rows(path)] == [(1, record)]


def test_json_object_with_several_lists_is_a_data_error(tmp_path):
    path = write(tmp_path / "rows.json", json.dumps({"train": [{"a": 1}], "test": [{"a": 2}]}))

    with pytest.raises(DataError, match=r"several lists of objects \(train, test\)"):
        list(read_rows(path))


def test_json_lines_under_a_json_name_are_read_as_jsonl(tmp_path):
    path = write(tmp_path / "rows.json", '{"a": 1}\n{"a": 2}\n')

    assert detect_file_format(path) == "jsonl"
    assert [(r.line, r.data) for r in read_rows(path)] == [(1, {"a": 1}), (2, {"a": 2})]


def test_broken_json_document_names_line_and_column(tmp_path):
    path = write(tmp_path / "rows.json", '[\n  {"a": 1},\n  {"a": }\n]\n')

    with pytest.raises(DataError) as caught:
        list(read_rows(path))

    assert str(caught.value) == (
        f"{path} is not valid JSON (line 3, column 9: Expecting value); fix the file, "
        "or pass --format jsonl if it holds one object per line"
    )


def test_non_utf8_json_document_is_a_data_error(tmp_path):
    path = write(tmp_path / "rows.json", b'[\n  {"a": "ok"},\n  {"a": "caf\xe9"}\n]\n')

    with pytest.raises(DataError) as caught:
        list(read_rows(path))

    # "[\n" is 2 bytes, the first item line 15, then 12 bytes up to the bad one: offset 29
    assert str(caught.value) == (
        f"{path} is not valid UTF-8 (bytes 0xe9 at offset 29, line 3); re-encode the file as UTF-8"
    )


def test_empty_json_array_is_a_data_error(tmp_path):
    path = write(tmp_path / "rows.json", "[]")

    with pytest.raises(DataError, match=r"is empty \(0 rows\)"):
        list(read_rows(path))


# CSV


def test_csv_rows_keyed_by_header_with_multiline_field(tmp_path):
    text = 'prompt,chosen,rejected\nhi,"hello, you",bye\n"two\nlines",a,b\n\nlast,c,d\n'
    path = write(tmp_path / "pairs.csv", text)

    rows = list(read_rows(path))

    assert [(r.line, r.data) for r in rows] == [
        (2, {"prompt": "hi", "chosen": "hello, you", "rejected": "bye"}),
        (3, {"prompt": "two\nlines", "chosen": "a", "rejected": "b"}),
        (6, {"prompt": "last", "chosen": "c", "rejected": "d"}),
    ]


def test_csv_row_with_wrong_number_of_fields_is_a_row_error(tmp_path):
    path = write(tmp_path / "pairs.csv", "a,b,c\n1,2,3\n1,2\n4,5,6\n")

    rows = list(read_rows(path))

    assert rows[1].line == 3 and rows[1].data is None
    assert rows[1].error == (
        "row has 2 fields but the header has 3; check the quoting and delimiters of this row"
    )
    assert [r.data for r in rows if r.error is None] == [
        {"a": "1", "b": "2", "c": "3"},
        {"a": "4", "b": "5", "c": "6"},
    ]


def test_csv_non_utf8_row_is_a_row_error(tmp_path):
    path = write(tmp_path / "pairs.csv", b"a,b\nx,\xff\xfe\ny,z\n")

    rows = list(read_rows(path))

    assert rows[0].error == (
        "not valid UTF-8 (bytes 0xff at offset 2); re-encode the file as UTF-8"
    )
    assert (rows[1].line, rows[1].data) == (3, {"a": "y", "b": "z"})


def test_csv_without_header_is_a_data_error(tmp_path):
    path = write(tmp_path / "scores.csv", "hello,world,4.5\nbye,moon,2\n")

    with pytest.raises(DataError, match=r"has no header row .* add a header row"):
        list(read_rows(path))


def test_csv_with_duplicate_header_names_is_a_data_error(tmp_path):
    path = write(tmp_path / "dup.csv", "text,text\na,b\n")

    with pytest.raises(DataError, match="names text more than once"):
        list(read_rows(path))


def test_csv_with_only_a_header_is_empty(tmp_path):
    path = write(tmp_path / "head.csv", "prompt,chosen,rejected\n")

    with pytest.raises(DataError, match=r"is empty \(0 rows\); check the export"):
        list(read_rows(path))


# TSV


def test_tsv_is_headerless_unquoted_and_positional(tmp_path):
    text = 'g\tf\t2012\t0001\t5.000\tHe said "hi.\tA "quoted" text\n\ng\tf\t2012\t0002\t1.5\ta\tb\n'
    path = write(tmp_path / "sts.tsv", text)

    rows = list(read_rows(path))

    assert [(r.line, r.data) for r in rows] == [
        (1, {"columns": ["g", "f", "2012", "0001", "5.000", 'He said "hi.', 'A "quoted" text']}),
        (3, {"columns": ["g", "f", "2012", "0002", "1.5", "a", "b"]}),
    ]


def test_tab_separated_csv_name_is_detected_as_tsv(tmp_path):
    path = write(tmp_path / "sts-train.csv", "g\tf\t2012\t0001\t4.0\tOne, two.\tThree.\n")

    assert detect_file_format(path) == "tsv"
    assert next(read_rows(path)).data["columns"][5] == "One, two."


# Parquet


def test_parquet_rows_are_numbered_from_one(tmp_path):
    path = tmp_path / "rows.parquet"
    table = pa.table({"anchor": ["a", "b", "c"], "score": [1.0, 2.5, None]})
    pq.write_table(table, path, row_group_size=2)

    rows = list(read_rows(str(path)))

    assert [(r.line, r.data) for r in rows] == [
        (1, {"anchor": "a", "score": 1.0}),
        (2, {"anchor": "b", "score": 2.5}),
        (3, {"anchor": "c", "score": None}),
    ]


def test_zero_byte_parquet_is_a_data_error(tmp_path):
    path = write(tmp_path / "rows.parquet", b"")

    with pytest.raises(DataError, match=r"is empty \(0 bytes\); check the export"):
        list(read_rows(path))


def test_corrupt_parquet_is_a_data_error(tmp_path):
    path = write(tmp_path / "rows.parquet", b"PAR1 this is not parquet at all")

    with pytest.raises(DataError, match="is not a readable Parquet file"):
        list(read_rows(path))


def test_parquet_with_no_rows_is_empty(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"a": pa.array([], pa.string())}), path)

    with pytest.raises(DataError, match=r"is empty \(0 rows\)"):
        list(read_rows(str(path)))


# saved datasets folders


def test_saved_dataset_folder(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["x", "y"], "n": [1, 2]}).save_to_disk(tmp_path / "ds")

    rows = list(read_rows(str(tmp_path / "ds")))

    assert detect_file_format(str(tmp_path / "ds")) == "datasets"
    assert [(r.line, r.data) for r in rows] == [
        (1, {"text": "x", "n": 1}),
        (2, {"text": "y", "n": 2}),
    ]


def test_saved_dataset_dict_reads_train(tmp_path):
    import datasets

    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["t1", "t2", "t3"]}),
            "test": datasets.Dataset.from_dict({"text": ["e1"]}),
        }
    ).save_to_disk(tmp_path / "dd")

    assert [r.data["text"] for r in read_rows(str(tmp_path / "dd"))] == ["t1", "t2", "t3"]
    # a split folder is a dataset of its own
    assert [r.data["text"] for r in read_rows(str(tmp_path / "dd" / "test"))] == ["e1"]


def test_saved_dataset_dict_without_train_asks_for_a_split(tmp_path):
    import datasets

    datasets.DatasetDict(
        {
            "a": datasets.Dataset.from_dict({"text": ["1"]}),
            "b": datasets.Dataset.from_dict({"text": ["2"]}),
        }
    ).save_to_disk(tmp_path / "dd")

    with pytest.raises(DataError, match=r"holds splits a, b and no 'train'; point at one"):
        list(read_rows(str(tmp_path / "dd")))


def test_plain_folder_is_not_a_dataset(tmp_path):
    (tmp_path / "folder").mkdir()

    with pytest.raises(DataError, match="not a saved datasets folder"):
        list(read_rows(str(tmp_path / "folder")))


# whole-file problems


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl does not exist; check the path"):
        list(read_rows(str(tmp_path / "nope.jsonl")))


def test_unknown_extension_names_the_fix(tmp_path):
    path = write(tmp_path / "rows.txt", '{"a": 1}\n')

    with pytest.raises(DataError) as caught:
        list(read_rows(path))

    assert str(caught.value) == (
        f"cannot tell the format of {path}; pass --format jsonl|json|csv|tsv|parquet|datasets"
    )
    # naming the format reads the same file
    assert [r.data for r in read_rows(path, file_format="jsonl")] == [{"a": 1}]


def test_unknown_file_format_is_a_data_error(tmp_path):
    path = write(tmp_path / "rows.jsonl", '{"a": 1}\n')

    with pytest.raises(DataError, match="unknown file format 'xml'"):
        list(read_rows(path, file_format="xml"))


# S3


@pytest.mark.integration
def test_reads_gzip_jsonl_and_a_dataset_folder_from_s3(s3_env, tmp_path):
    import datasets

    from alignpipe import storage

    uri = f"{s3_env}/exports/pairs.jsonl.gz"
    storage.write_bytes(uri, gzip.compress(b'{"a": 1}\n{"a": oops\n\n{"a": 3}\n'))

    rows = list(read_rows(uri))

    assert [(r.source, r.line, r.data) for r in rows] == [
        (uri, 1, {"a": 1}),
        (uri, 2, None),
        (uri, 4, {"a": 3}),
    ]
    assert rows[1].error.startswith("invalid JSON at column 7")

    datasets.Dataset.from_dict({"text": ["p", "q"]}).save_to_disk(tmp_path / "ds")
    storage.upload(tmp_path / "ds", f"{s3_env}/saved/ds")
    assert [r.data["text"] for r in read_rows(f"{s3_env}/saved/ds")] == ["p", "q"]
