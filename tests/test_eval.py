"""Evaluation: hand-computed WER / CER / J/WER, normalisers, combining shards, the evaluate CLI."""
from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import runpy
import subprocess
import sys

import jiwer
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ark_ray.eval import (
    ErrorCounts, EvalError, EvalReport, NormalizerError, Scores, cer, cer_counts, evaluate_rows,
    format_table, get_normalizer, has_cjk, jwer, jwer_counts, score, score_texts, total, wer, wer_counts,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
PY = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else sys.executable


# ------------------------------------------------------------------ metrics, by hand


def test_wer_hand_computed():
    refs = ["the cat sat on the mat", "hello world"]
    hyps = ["the cat sit on mat", "hello big world"]
    # utt 1: sat->sit (1 S), second "the" dropped (1 D); 6 ref words
    # utt 2: "big" inserted (1 I); 2 ref words
    # corpus WER = (1 + 1 + 1) / (6 + 2) = 3/8
    c = wer_counts(refs, hyps)
    assert (c.substitutions, c.deletions, c.insertions, c.ref_len, c.utterances) == (1, 1, 1, 8, 2)
    assert wer(refs, hyps) == pytest.approx(3 / 8)
    assert wer(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps))  # same corpus-level definition
    # not the mean of per-utterance rates: (2/6 + 1/2) / 2 = 0.4167 != 0.375
    assert wer(refs, hyps) != pytest.approx((2 / 6 + 1 / 2) / 2)


def test_cer_hand_computed_ignores_spaces():
    refs = ["你好世界", "a bc"]
    hyps = ["你号世界了", "ab"]
    # utt 1: 好->号 (1 S), 了 inserted (1 I); 4 ref chars
    # utt 2: "abc" vs "ab" (spaces removed): c deleted (1 D); 3 ref chars
    # corpus CER = 3 / 7
    c = cer_counts(refs, hyps)
    assert (c.substitutions, c.deletions, c.insertions, c.ref_len) == (1, 1, 1, 7)
    assert cer(refs, hyps) == pytest.approx(3 / 7)
    # a space alone is not an error: "a b c" vs "abc" -> 0 edits / 3 chars
    assert cer(["a b c"], ["abc"]) == 0.0


def test_jwer_cer_for_cjk_refs_wer_otherwise():
    refs = ["今天天气很好", "the cat sat"]
    hyps = ["今天天汽很好", "the cat sat down"]
    # J/WER: utt 1 has CJK -> CER: 气->汽 = 1 S over 6 chars
    #        utt 2 no CJK  -> WER: "down" = 1 I over 3 words
    #        J/WER = (1 + 1) / (6 + 3) = 2/9
    assert jwer(refs, hyps) == pytest.approx(2 / 9)
    j = jwer_counts(refs, hyps)
    assert (j.substitutions, j.insertions, j.ref_len) == (1, 1, 9)
    # plain WER treats the unsegmented Chinese as one word: (1 S + 1 I) / (1 + 3) = 1/2
    assert wer(refs, hyps) == pytest.approx(1 / 2)
    # plain CER: 1 S / 6 + "thecatsat" -> "thecatsatdown" 4 I / 9 = 5/15
    assert cer(refs, hyps) == pytest.approx(5 / 15)


def test_cjk_detection_matches_seed_ranges():
    assert has_cjk("中") and has_cjk("カタカナ") and has_cjk("ひらがな") and has_cjk("한국어")
    assert not has_cjk("café ÅÆ") and not has_cjk("，。！") and not has_cjk("１２３")


def test_empty_references_are_skipped_and_counted():
    # ref 1 empty: its 2 inserted words cannot be divided by anything -> left out (as open-audio-opd's eval script does)
    # ref 2: 1 S over 2 words -> WER 1/2
    c = wer_counts(["", "a b"], ["x y", "a c"])
    assert (c.utterances, c.empty_refs, c.errors, c.ref_len, c.empty_ref_insertions) == (1, 1, 1, 2, 2)
    assert c.rate == pytest.approx(0.5)
    # only empty references: nothing scored, the rate is NaN, nothing crashes
    assert math.isnan(wer(["", "  "], ["a", ""]))
    assert math.isnan(jwer([""], [""]))
    # empty hypothesis: every reference word deleted
    assert wer(["a b c"], [""]) == 1.0
    # a reference that normalises to nothing ("[noise]" is a bracketed span) is skipped too
    c = wer_counts(["[noise]", "yes"], ["hello", "yes"], normalizer="english")
    assert (c.empty_refs, c.ref_len, c.errors) == (1, 1, 0)


def test_bad_inputs_raise_eval_error():
    with pytest.raises(EvalError, match="2 references but 1"):
        wer(["a", "b"], ["a"])
    with pytest.raises(EvalError, match="must be str"):
        wer(["a", None], ["a", "b"])
    with pytest.raises(NormalizerError, match="unknown normaliser"):
        wer(["a"], ["a"], normalizer="klingon")
    assert isinstance(EvalError("x"), ValueError) and isinstance(NormalizerError("x"), ValueError)


def test_single_strings_are_one_utterance():
    assert wer("the cat", "the dog") == pytest.approx(1 / 2)


# ------------------------------------------------------------------ combining shards


def test_shard_counts_combine_exactly():
    refs = ["the cat sat on the mat", "今天天气很好", "", "hello world", "這是測試"]
    hyps = ["the cat sit on mat", "今天天汽很好", "noise", "hello big world", "这是测验"]
    whole = score(refs, hyps, "auto")
    parts = [score(refs[:2], hyps[:2], "auto"), score(refs[2:3], hyps[2:3], "auto"), score(refs[3:], hyps[3:], "auto")]
    assert sum(parts) == whole
    assert parts[0] + parts[1] + parts[2] == whole
    assert whole.jwer.empty_refs == 1 and whole.jwer.utterances == 4
    # combined rate is total edits / total units, not the mean of shard rates
    assert whole.jwer.rate == pytest.approx(sum(p.jwer.errors for p in parts) / sum(p.jwer.ref_len for p in parts))
    # counts survive JSON (how shard results travel between processes)
    assert Scores.from_dict(json.loads(json.dumps(whole.to_dict()))) == whole
    assert ErrorCounts.from_dict(whole.wer.to_dict()) == whole.wer


def test_report_total_and_table():
    a = EvalReport("a.jsonl", n=3, error_rows=1, scores=score(["a b"], ["a c"]))       # WER 1/2
    b = EvalReport("b.parquet", n=1, scores=score(["x y z w"], ["x y z w"]))          # WER 0/4
    t = total([a, b])
    assert (t.n, t.error_rows, t.scores.wer.ref_len, t.scores.wer.errors) == (4, 1, 6, 1)
    assert t.summary()["wer"] == pytest.approx(1 / 6)
    table = format_table([a, b])
    lines = table.splitlines()
    assert lines[0].startswith("| file") and "J/WER %" in lines[0]
    assert len(lines) == 5 and lines[-1].startswith("| total")
    assert "50.00" in lines[2] and "16.67" in lines[-1]
    assert EvalReport.from_dict(json.loads(json.dumps(a.to_dict()))).scores == a.scores
    # nothing scored -> "-" rather than nan
    assert "| -" in format_table([EvalReport("empty", n=1, error_rows=1)]).splitlines()[-1].replace("  ", "")


# ------------------------------------------------------------------ normalisers


@pytest.mark.parametrize("raw, expected", [
    ("Hello, World!", "hello world"),
    ("Mr. Smith and Dr. Jones", "mister smith and doctor jones"),              # titles expanded
    ("The colour grey; we analysed it.", "the color gray we analyzed it"),     # British -> American
    ("I won't go, she's gonna wait", "i will not go she is going to wait"),    # contractions
    ("[laughs] okay (inaudible) fine", "okay fine"),                          # annotations removed
    ("twenty five dollars in nineteen ninety nine", "$25 in 1999"),            # numbers -> digits
    ("um so uh yes", "so yes"),                                                # fillers removed
])
def test_english_normalizer_is_whispers(raw, expected):
    assert get_normalizer("english")(raw) == expected


def test_chinese_normalizer():
    zh = get_normalizer("chinese")
    assert zh("頭髮還沒乾") == "头发还没干"                           # traditional -> simplified
    assert zh("你好，世界！（测试）「引号」《书名》…") == "你好世界测试引号书名"   # full-width punctuation
    assert zh("我们 有 １２３ 个 ＡＰＰ。") == "我们有123个app"           # full-width forms, spaces
    assert zh("Hello, 世界.") == "hello世界"                            # ASCII punctuation too


def test_basic_and_seed_normalizers():
    assert get_normalizer("basic")("Héllo, Wörld! [x] ＡＢ") == "héllo wörld ab"
    from ark_ray.eval import BasicNormalizer
    assert BasicNormalizer(remove_diacritics=True)("Héllo Wörld") == "hello world"
    # open-audio-opd's eval-script cleanup: full-width digits -> ASCII, its punctuation class removed, lower-case
    assert get_normalizer("seed")("Ｈｉ １２３，Hello!  World") == "ｈｉ 123hello world"
    assert get_normalizer("none")("  A  b ") == "A b"
    assert get_normalizer(None)("x") == "x"


def test_auto_normalizer_follows_the_reference():
    # a CJK reference: both sides get the Chinese normaliser (traditional hypothesis still matches)
    u = score_texts(["今天天氣很好。"], ["今天天气很好"], normalizer="auto")[0]
    assert (u.ref_clean, u.hyp_clean, u.cjk, u.mixed.errors) == ("今天天气很好", "今天天气很好", True, 0)
    # an English reference: both sides get Whisper's English normaliser
    u = score_texts(["Mr. Brown paid twenty dollars."], ["mister brown paid $20"], normalizer="auto")[0]
    assert (u.ref_clean, u.cjk, u.mixed.errors) == ("mister brown paid $20", False, 0)
    # without normalisation the same pair has errors
    assert jwer(["Mr. Brown paid twenty dollars."], ["mister brown paid $20"]) > 0


def test_custom_callable_normalizer():
    assert wer(["A B"], ["a b"], normalizer=str.lower) == 0.0
    with pytest.raises(NormalizerError, match="returned"):
        wer(["a"], ["a"], normalizer=lambda s: None)


# ------------------------------------------------------------------ rows and the CLI


def test_evaluate_rows_excludes_and_lists_error_rows():
    rows = [
        {"id": "u1", "text": "a b", "pred_text": "a b", "error": None},
        {"id": "u2", "text": "c d", "pred_text": "", "error": "audio: unreadable"},
        {"id": "u3", "text": "e f"},                                   # no prediction at all
        {"id": "u4", "text": "g h", "pred_text": "g x", "error": None},
    ]
    report, scored = evaluate_rows(rows, "x.jsonl")
    # scored: u1 (0/2) and u4 (1/2) -> 1/4; u2 would add 2 deletions if it were counted
    assert (report.n, report.error_rows) == (4, 2)
    assert report.summary()["wer"] == pytest.approx(1 / 4)
    assert [e["id"] for e in report.errors] == ["u2", "u3"] and "unreadable" in report.errors[0]["error"]
    assert scored[0]["id"] == "u4" and scored[0]["jwer_errors"] == 1          # worst first
    assert {r["id"] for r in scored[-2:]} == {"u2", "u3"}
    with pytest.raises(EvalError, match="row 1"):
        evaluate_rows([{"pred_text": "x"}], "bad.jsonl")


def _job():
    """jobs/evaluate.py as a module (by path: `evaluate` is also a PyPI package's name)."""
    spec = importlib.util.spec_from_file_location("ark_jobs_evaluate", REPO / "jobs/evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def test_cli_jsonl_parquet_and_shard_folder(tmp_path):
    _write_jsonl(tmp_path / "en.jsonl", [
        {"audio": "a.wav", "text": "The colour is grey.", "pred_text": "the color is gray", "error": None},
        {"audio": "b.wav", "text": "hello world", "pred_text": "hello word", "error": None},
        {"audio": "c.wav", "text": "good morning", "pred_text": "", "error": "AudioError: unreadable"},
    ])
    # en.jsonl: utt a 0 errors (normalised), utt b 1 S -> WER 1/(4+2) = 1/6; c is an error row
    pq.write_table(pa.Table.from_pylist([
        {"audio": "z1.wav", "text": "今天天氣很好。", "pred_text": "今天天汽很好", "error": None},
        {"audio": "z2.wav", "text": "谢谢", "pred_text": "谢谢你", "error": None},
    ]), tmp_path / "zh.parquet")
    # zh.parquet: CER (1 S + 1 I) / (6 + 2) = 2/8 = J/WER
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_jsonl(shards / "part-0.json", [{"text": "red blue", "pred_text": "red blue"}])
    _write_jsonl(shards / "part-1.json", [{"text": "green yellow", "pred_text": "green"}])
    (shards / "_SUCCESS").write_text("")
    # shards/: one dataset, (0 + 1 D) / (2 + 2) = 1/4
    out = tmp_path / "out" / "report.json"
    proc = subprocess.run(
        [PY, str(REPO / "jobs/evaluate.py"), "--predictions", str(tmp_path / "en.jsonl"),
         str(tmp_path / "zh.parquet"), str(shards), "--output", str(out), "--scored-dir", str(tmp_path / "scored")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "J/WER %" in proc.stdout and "| total" in proc.stdout
    assert proc.stdout.count("\n") <= 60 and proc.stderr == "", proc.stdout + proc.stderr   # the console stays short
    assert "AudioError: unreadable" in proc.stdout
    rep = json.loads(out.read_text())
    en, zh, sh = rep["datasets"]
    assert (en["n"], en["scored"], en["error_rows"]) == (3, 2, 1)
    assert en["wer"] == pytest.approx(1 / 6) and en["jwer"] == pytest.approx(1 / 6)
    assert en["errors"][0]["id"] == "c.wav"
    assert zh["jwer"] == pytest.approx(2 / 8) and zh["cer"] == pytest.approx(2 / 8)
    assert (sh["n"], sh["jwer"]) == (2, pytest.approx(1 / 4))
    # total: J/WER edits 1 + 2 + 1 = 4 over units 6 + 8 + 4 = 18
    assert rep["total"]["jwer"] == pytest.approx(4 / 18) and rep["total"]["n"] == 7
    scored = sorted((tmp_path / "scored").iterdir())
    assert len(scored) == 3
    first = json.loads(scored[1].read_text().splitlines()[0])
    assert first["audio"] == "z1.wav" and first["ref_text_clean"] == "今天天气很好"


def test_cli_per_file_and_bad_paths(tmp_path, capsys, monkeypatch):
    job = _job()
    d = tmp_path / "d"
    d.mkdir()
    _write_jsonl(d / "a.jsonl", [{"text": "x y", "pred_text": "x"}])
    _write_jsonl(d / "b.jsonl", [{"text": "x y", "pred_text": "x y"}])
    res = job.main(["--predictions", str(d), "--per-file", "--normalizer", "none"])
    assert [r["jwer"] for r in res["datasets"]] == [0.5, 0.0]
    assert res["total"]["jwer"] == pytest.approx(1 / 4)
    with pytest.raises(EvalError, match="no such file"):
        job.main(["--predictions", str(tmp_path / "missing.jsonl")])
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "pred_text": "a"}\nnot json\n')
    with pytest.raises(EvalError, match="bad.jsonl:2"):
        job.main(["--predictions", str(tmp_path / "bad.jsonl")])
    # run as a script, a bad path is one clear message and exit status 2 (no traceback)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--predictions", str(tmp_path / "nope")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "jobs/evaluate.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_cli_reads_s3_prefix(tmp_path, monkeypatch, aws_env, s3_client):
    for k, v in aws_env.items():
        monkeypatch.setenv(k, v)
    s3_client.create_bucket(Bucket="preds")
    s3_client.put_object(Bucket="preds", Key="run1/part-0.jsonl",
                         Body=json.dumps({"text": "a b c", "pred_text": "a b"}).encode() + b"\n")
    s3_client.put_object(Bucket="preds", Key="run1/part-1.jsonl",
                         Body=json.dumps({"text": "d e", "pred_text": "d e"}).encode() + b"\n")
    job = _job()
    res = job.main(["--predictions", "s3://preds/run1", "--output", str(tmp_path / "r.json")])
    # two shards, one dataset: 1 D over 3 + 2 words
    assert res["datasets"][0]["n"] == 2 and res["datasets"][0]["wer"] == pytest.approx(1 / 5)
