"""The one row-file reader (ark_ray.data.row_files): JSON lines (plain and .gz) and Parquet."""
import gzip
import json

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from ark_ray.data.row_files import BadLine, RowFileError, iter_rows, read_rows, read_table, table_of


def _jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_jsonl_rows_with_where_skipping_blank_lines_and_marking_bad_ones(tmp_path):
    p = _jsonl(tmp_path / "m.jsonl", ['{"a": 1}', "", "{nope", "[1, 2]", '{"b": "x"}'])
    got = list(iter_rows(p))
    assert [w for w, _ in got] == [f"{p}:1", f"{p}:3", f"{p}:4", f"{p}:5"]
    assert got[0][1] == {"a": 1} and got[2][1] == [1, 2] and got[3][1] == {"b": "x"}
    assert isinstance(got[1][1], BadLine) and "not valid JSON" in got[1][1].msg


def test_read_rows_names_the_line_at_fault(tmp_path):
    with pytest.raises(RowFileError, match=r"m\.jsonl:2: not valid JSON"):
        list(read_rows(_jsonl(tmp_path / "m.jsonl", ['{"a": 1}', "{nope"])))
    with pytest.raises(RowFileError, match=r"m\.jsonl:1: a row must be a JSON object"):
        list(read_rows(_jsonl(tmp_path / "m.jsonl", ["[1]"])))


def test_gzip_jsonl_and_a_given_filesystem(tmp_path):
    p = tmp_path / "p.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"text": "a"}\n{"text": "b"}\n'))
    assert list(read_rows(str(p), pafs.LocalFileSystem())) == [{"text": "a"}, {"text": "b"}]


def test_table_keeps_every_rows_columns(tmp_path):
    p = _jsonl(tmp_path / "t.jsonl", [json.dumps({"key": "a"}), json.dumps({"key": "b", "error": "x", "n": 2})])
    t = read_table(p)
    assert t.column_names == ["key", "error", "n"] and t.column("error").to_pylist() == [None, "x"]
    assert read_table(p, columns=["key", "error"]).column_names == ["key", "error"]
    assert table_of([{"a": 1}, {"b": 2}]).to_pylist() == [{"a": 1, "b": None}, {"a": None, "b": 2}]


def test_parquet_rows_columns_and_a_broken_file(tmp_path):
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"key": ["a", "b"], "error": [None, "x"], "n": [1, 2]}), p)
    assert [w for w, _ in iter_rows(p)] == [f"{p}:row 1", f"{p}:row 2"]
    assert list(read_rows(p))[1] == {"key": "b", "error": "x", "n": 2}
    assert read_table(p, columns=["key"]).column_names == ["key"]
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(RowFileError, match="unreadable Parquet"):
        read_table(bad)
