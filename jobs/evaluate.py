"""Score transcription output (WER, CER, J/WER):

    python jobs/evaluate.py --predictions out/dev.jsonl out/test/ s3://bucket/preds/ \\
        [--output=report.json] [--normalizer=auto] [--scored_dir=DIR] [--config FILE] [--key=value ...]

Each FILE is one table row; each DIR (or URI prefix) is one dataset whose .jsonl/.json/.parquet
shards (as Ray Data or jobs/transcribe.py write them) are combined into one row, or one row per
file with --per_file. Rows need the reference in `text` and the prediction in `pred_text`; rows
with a non-null `error` are counted as errors and left out of the rates. Ends with a table and a
total row that combines edit counts (not rates). Every key is in docs/config.md (EvaluateConfig).
A bad path or key is one line on stderr and exit status 2 (`--debug` for the traceback).
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Iterator

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # `python jobs/evaluate.py` from a clone, without an installed package
    sys.path.insert(0, str(REPO))

import pyarrow.fs as pafs  # noqa: E402

from ark_ray.cli import run_job  # noqa: E402
from ark_ray.config import EvaluateConfig, parse_job_args  # noqa: E402
from ark_ray.data import row_files  # noqa: E402
from ark_ray.data.preflight import open_output  # noqa: E402
from ark_ray.data.row_files import SUFFIXES, RowFileError  # noqa: E402
from ark_ray.eval import EvalError, EvalReport, evaluate_rows, format_table, total  # noqa: E402


def parse_args(argv: list[str] | None) -> EvaluateConfig:
    """`[--config FILE] [--key=value ...]` (docs/config.md, EvaluateConfig); hyphens read as underscores."""
    cfg = parse_job_args(EvaluateConfig, sys.argv[1:] if argv is None else argv)
    cfg.check_ready()
    return cfg


def preflight(cfg: EvaluateConfig) -> list[tuple[str, pafs.FileSystem, list[str]]]:
    """Before any row is read: every predictions path exists and holds row files, and the report's
    folder and scored_dir can be written."""
    sources = prediction_sources(cfg.predictions, cfg.per_file)
    if cfg.output:
        open_output(str(pathlib.Path(cfg.output).resolve().parent), "output")
    if cfg.scored_dir:
        open_output(cfg.scored_dir, "scored_dir")
    return sources


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
    """Rows of one JSON-lines or Parquet file (the shared reader, ark_ray.data.row_files)."""
    try:
        yield from row_files.read_rows(path, fs)
    except RowFileError as e:
        raise EvalError(str(e)) from None


def evaluate(cfg: EvaluateConfig, sources=None) -> list[EvalReport]:
    """One report per dataset. (A `--model` mode would transcribe manifests into rows first.)"""
    reports = []
    for name, fs, files in sources if sources is not None else prediction_sources(cfg.predictions, cfg.per_file):
        rows = (row for f in files for row in read_rows(fs, f))
        report, scored = evaluate_rows(rows, name, normalizer=cfg.normalizer, text_field=cfg.text_field,
                                       pred_field=cfg.pred_field, max_listed=cfg.max_listed_errors)
        reports.append(report)
        if cfg.scored_dir:
            _write_scored(cfg.scored_dir, len(reports), name, scored)
    return reports


def _write_scored(folder: str, index: int, name: str, rows: list[dict]) -> None:
    stem = pathlib.PurePosixPath(name.rstrip("/")).name.split(".")[0] or "predictions"
    out = pathlib.Path(folder) / f"{index:02d}_{stem}.scored.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    sources = preflight(cfg)
    n_files = sum(len(files) for _, _, files in sources)
    print(f"evaluate: {len(sources)} dataset(s) in {n_files} file(s); normalizer {cfg.normalizer}; "
          f"{cfg.text_field} vs {cfg.pred_field}", flush=True)
    reports = evaluate(cfg, sources)
    result = {"normalizer": cfg.normalizer, "datasets": [r.to_dict() for r in reports],
              "total": total(reports).to_dict()}
    print(format_table(reports))
    for r in reports:
        for e in r.errors:
            where = f"row {e['row']}" + (f" ({e['id']})" if e.get("id") is not None else "")
            print(f"error row: {r.name} {where}: {e['error']}")
    if cfg.output:
        out = pathlib.Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(f"report: {out}")
    return result


if __name__ == "__main__":
    run_job("evaluate", main)
