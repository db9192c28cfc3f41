"""Score transcription output (WER, CER, J/WER):

    python jobs/evaluate.py --predictions out/dev.jsonl out/test/ s3://bucket/preds/ \\
        [--output report.json] [--normalizer auto] [--scored-dir DIR]

Each FILE is one table row; each DIR (or URI prefix) is one dataset whose .jsonl/.json/.parquet
shards (as Ray Data or jobs/transcribe.py write them) are combined into one row, or one row per
file with --per-file. Rows need the reference in `text` and the prediction in `pred_text`; rows
with a non-null `error` are counted as errors and left out of the rates. Ends with a table and a
total row that combines edit counts (not rates).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Iterator

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ark_ray.eval import NORMALIZERS, EvalError, EvalReport, evaluate_rows, format_table, total

SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", nargs="+", required=True, metavar="FILE_OR_DIR",
                   help="prediction files, or folders/URI prefixes of shards (local, s3://, gs://)")
    p.add_argument("--output", help="write the report (per file, total, error rows) as JSON here")
    p.add_argument("--normalizer", default="auto", choices=sorted(NORMALIZERS),
                   help="text normaliser for both sides (auto: Chinese for CJK references, else Whisper English)")
    p.add_argument("--text-field", default="text", help="column with the reference transcript")
    p.add_argument("--pred-field", default="pred_text", help="column with the prediction")
    p.add_argument("--per-file", action="store_true", help="one row per file, also inside folders")
    p.add_argument("--scored-dir", help="write each dataset's rows with cleaned texts and edit counts here, "
                                        "worst first (<name>.scored.jsonl)")
    p.add_argument("--max-listed-errors", type=int, default=20, help="error rows listed per dataset")
    return p.parse_args(argv)


def _filesystem(spec: str) -> tuple[pafs.FileSystem, str]:
    if "://" in spec:
        try:
            return pafs.FileSystem.from_uri(spec)
        except Exception as e:
            raise EvalError(f"cannot open {spec}: {e}") from None
    return pafs.LocalFileSystem(), os.path.abspath(spec)


def prediction_sources(specs: list[str], per_file: bool = False) -> list[tuple[str, pafs.FileSystem, list[str]]]:
    """(name, filesystem, files) per dataset: a file is its own dataset, a folder's shards one."""
    sources = []
    for spec in specs:
        fs, path = _filesystem(spec)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            if not path.endswith(SUFFIXES):
                raise EvalError(f"{spec}: not a predictions file (expected one of {', '.join(SUFFIXES)})")
            sources.append((spec, fs, [path]))
        elif info.type == pafs.FileType.Directory:
            files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                           if f.type == pafs.FileType.File and f.path.endswith(SUFFIXES)
                           and not os.path.basename(f.path).startswith((".", "_")))
            if not files:
                raise EvalError(f"{spec}: no {'/'.join(SUFFIXES)} files in this folder")
            if per_file:
                sources += [(f if "://" in spec else os.path.relpath(f), fs, [f]) for f in files]
            else:
                sources.append((spec, fs, files))
        else:
            raise EvalError(f"{spec}: no such file or folder")
    return sources


def read_rows(fs: pafs.FileSystem, path: str) -> Iterator[dict]:
    """Rows of one JSON-lines or Parquet file."""
    if path.endswith(".parquet"):
        try:
            yield from pq.read_table(path, filesystem=fs).to_pylist()
        except Exception as e:
            raise EvalError(f"{path}: unreadable Parquet ({e})") from None
        return
    with fs.open_input_stream(path, compression="detect") as f:
        text = f.read().decode("utf-8")
    for i, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise EvalError(f"{path}:{i}: a row must be a JSON object")
            yield row


def evaluate(args: argparse.Namespace) -> list[EvalReport]:
    """One report per dataset. (A `--model` mode would transcribe manifests into rows first.)"""
    reports = []
    for name, fs, files in prediction_sources(args.predictions, args.per_file):
        rows = (row for f in files for row in read_rows(fs, f))
        report, scored = evaluate_rows(rows, name, normalizer=args.normalizer, text_field=args.text_field,
                                       pred_field=args.pred_field, max_listed=args.max_listed_errors)
        reports.append(report)
        if args.scored_dir:
            _write_scored(args.scored_dir, len(reports), name, scored)
    return reports


def _write_scored(folder: str, index: int, name: str, rows: list[dict]) -> None:
    stem = pathlib.PurePosixPath(name.rstrip("/")).name.split(".")[0] or "predictions"
    out = pathlib.Path(folder) / f"{index:02d}_{stem}.scored.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    reports = evaluate(args)
    result = {"normalizer": args.normalizer, "datasets": [r.to_dict() for r in reports],
              "total": total(reports).to_dict()}
    print(format_table(reports))
    for r in reports:
        for e in r.errors:
            where = f"row {e['row']}" + (f" ({e['id']})" if e.get("id") is not None else "")
            print(f"error row: {r.name} {where}: {e['error']}")
    if args.output:
        out = pathlib.Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(f"report: {out}")
    return result


if __name__ == "__main__":
    try:
        main()
    except EvalError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        sys.exit(2)
