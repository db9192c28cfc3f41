"""The manifest conventions of open-audio-opd's scripts (-1 = unset, end_time ignored when begin_time < 0, extra fields
kept), bad rows listed all at once or skipped with a count, and the batch job's listing keeping
bad rows as error inputs. No Ray: the reader and the listing only."""
from __future__ import annotations

import json

import pytest

from ark_ray.data.listing import load_inputs
from ark_ray.data.manifest import ManifestError, manifest_rows, normalize_segment, read_manifest

# rows in open-audio-opd's README format: {"audio","text","task":"asr","begin_time","end_time"}
SEED_ROWS = [
    {"audio": "clips/a.wav", "text": "whole file", "task": "asr", "begin_time": -1, "end_time": -1},
    {"audio": "clips/a.wav", "text": "a segment", "task": "asr", "begin_time": 1.5, "end_time": 3.25},
    {"audio": "clips/b.wav", "text": "end ignored", "task": "asr", "begin_time": -1, "end_time": 2.0},
    {"audio": "clips/b.wav", "text": "to the end", "task": "asr", "begin_time": 0.5, "end_time": -1},
]
BAD_LINES = [
    '{"audio": "clips/a.wav", "text": "backwards", "begin_time": 3.0, "end_time": 1.0}',
    '{"audio": "clips/a.wav", "text": "empty", "begin_time": 2.0, "end_time": 2.0}',
    '{"audio": "clips/a.wav", "text": "typed", "begin_time": "0.5", "end_time": 1.0}',
    '{"audio": "clips/a.wav", "text": "bool", "begin_time": true}',
    '{"audio": "clips/a.wav", "text": "truncated',
    '["clips/a.wav", "a list"]',
    '{"text": "no audio"}',
]
BAD_REASONS = ["bad_segment", "zero_length_segment", "bad_row", "bad_row", "bad_row", "bad_row", "bad_row"]


def write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_seed_sentinels_mean_unset():
    assert normalize_segment(-1, -1) == (None, None)
    assert normalize_segment(-1, 2.0) == (None, None)       # open-audio-opd ignores end_time when begin_time < 0
    assert normalize_segment(0.5, -1) == (0.5, None)
    assert normalize_segment(0, 2) == (0.0, 2.0)
    assert normalize_segment(None, 2) == (None, 2.0)


def test_seed_rows_read_with_extra_fields(tmp_path):
    rows = read_manifest(write(tmp_path / "train.jsonl", SEED_ROWS))
    assert [(r["begin_time"], r["end_time"]) for r in rows] == [(None, None), (1.5, 3.25), (None, None), (0.5, None)]
    assert [r["text"] for r in rows] == [r["text"] for r in SEED_ROWS]
    assert all(r["task"] == "asr" for r in rows)                                   # extra fields pass through
    assert rows[0]["audio"] == str(tmp_path / "clips" / "a.wav")
    assert rows[0]["id"] == f"{tmp_path / 'train.jsonl'}:1"


def test_seed_rows_in_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(SEED_ROWS), tmp_path / "train.parquet")
    rows = read_manifest(tmp_path / "train.parquet")
    assert [(r["begin_time"], r["end_time"]) for r in rows] == [(None, None), (1.5, 3.25), (None, None), (0.5, None)]


def test_training_reader_lists_every_bad_line(tmp_path):
    path = write(tmp_path / "m.jsonl", SEED_ROWS[:1] + BAD_LINES + SEED_ROWS[1:])
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    msg = str(e.value)
    assert f"{len(BAD_LINES)} bad row(s)" in msg
    for line, reason in zip(range(2, 2 + len(BAD_LINES)), BAD_REASONS):   # every bad line, not only the first
        assert f"{path}:{line}: {reason}:" in msg
    assert f"{path}:1:" not in msg and f"{path}:{2 + len(BAD_LINES)}:" not in msg


def test_skip_bad_rows_keeps_the_rest(tmp_path, caplog):
    path = write(tmp_path / "m.jsonl", SEED_ROWS[:1] + BAD_LINES + SEED_ROWS[1:])
    rows = read_manifest(path, skip_bad_rows=True)
    assert [r["text"] for r in rows] == [r["text"] for r in SEED_ROWS]
    assert f"skipped {len(BAD_LINES)} bad row(s) of {len(BAD_LINES) + len(SEED_ROWS)}" in caplog.text
    with pytest.raises(ManifestError, match="no usable rows"):
        read_manifest(write(tmp_path / "bad.jsonl", BAD_LINES), skip_bad_rows=True)


def test_text_required_only_where_asked(tmp_path):
    path = write(tmp_path / "m.jsonl", [{"audio": "a.wav"}])
    with pytest.raises(ManifestError, match="missing text field 'text'"):
        read_manifest(path)
    assert read_manifest(path, text_field=None)[0]["audio"] == str(tmp_path / "a.wav")


def test_batch_listing_keeps_bad_rows_as_error_inputs(tmp_path):
    path = write(tmp_path / "m.jsonl", SEED_ROWS[:1] + BAD_LINES + SEED_ROWS[1:])
    rows = load_inputs(str(path))
    assert len(rows) == len(SEED_ROWS) + len(BAD_LINES)                       # one input per line
    assert [r.get("_error") for r in rows[1:1 + len(BAD_LINES)]] == BAD_REASONS
    assert all(r.get("_error_detail") for r in rows[1:1 + len(BAD_LINES)])
    assert [r["key"] for r in rows[1:1 + len(BAD_LINES)]] == [f"{path}:{i}" for i in range(2, 2 + len(BAD_LINES))]
    a = str(tmp_path / "clips" / "a.wav")
    assert rows[0]["key"] == a and "_error" not in rows[0]                    # -1/-1: the whole file
    assert len({r["key"] for r in rows}) == len(rows)
    assert manifest_rows(path, text_field=None)[1]["text"] == "backwards"     # the bad row's fields kept
