"""Unlabelled demo audio for OPD: N distinct espeak-ng/flite utterances, made on first use, cached.

OPD needs no transcripts, only plenty of distinct audio from the student's domain (the 40
bundled train clips are too few: the student over-fits them, docs/benchmarks.md). The texts are
the demo train set's (never a test or dev text), from position 40 on (the first 40 are the
labelled `train_sample` split), spoken by the voice each utterance id hashes to; the manifest
carries no text. Same N, same files, on every machine with the same synthesizers.

    python -m ark_ray.demo.unlabelled --n 1000          # what `demo://unlabelled` resolves to
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from ark_ray.demo.corpus import REPO, SPLIT_SIZES, synthesize, texts_for

SCHEME = "demo://unlabelled"
DEFAULT_N = 1000
FIRST = SPLIT_SIZES["train_sample"]   # train texts before this are the labelled split's


def cache_dir(n: int) -> pathlib.Path:
    root = pathlib.Path(os.environ.get("ARK_DEMO_CACHE", REPO / "runs" / "demo_cache"))
    return root / f"unlabelled_{n}"


def parse(uri: str) -> Optional[int]:
    """`demo://unlabelled` or `demo://unlabelled-N` -> N; anything else -> None."""
    if not uri.startswith(SCHEME):
        return None
    rest = uri[len(SCHEME):]
    return int(rest[1:]) if rest.startswith("-") else DEFAULT_N


def ensure(n: int = DEFAULT_N, out: Optional[pathlib.Path] = None, workers: int = 4,
           progress: Optional[Callable[[int, int], None]] = None) -> pathlib.Path:
    """The manifest of the first n unlabelled utterances, generating the missing ones.
    The manifest is written last, so an interrupted run is resumed, never half-used."""
    out = out or cache_dir(n)
    manifest = out / "unlabelled.jsonl"
    if manifest.exists():
        return manifest
    for tool in ("espeak-ng", "flite"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing (the demo speaks its unlabelled audio with it): "
                               "run `bash scripts/setup.sh` or `apt-get install -y espeak-ng flite`")
    texts = texts_for("train", FIRST + n)[FIRST:]
    items = [(f"unlabelled-{i:05d}", t) for i, t in enumerate(texts)]
    done = [0]

    def one(item):
        utt_id, text = item
        rel = f"audio/{utt_id}.flac"
        path = out / rel
        if path.exists():
            import soundfile as sf
            dur = sf.info(str(path)).duration
        else:
            tmp = path.with_suffix(".part.flac")
            dur = synthesize(text, f"0:{utt_id}", tmp)
            tmp.rename(path)
        done[0] += 1
        if progress:
            progress(done[0], n)
        return {"id": utt_id, "audio": rel, "duration": round(dur, 4), "language": "en"}

    with ThreadPoolExecutor(max(1, workers)) as pool:   # the synthesizers are subprocesses
        rows = list(pool.map(one, items))
    tmp = manifest.with_suffix(".part")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(manifest)
    return manifest


def resolve(uri: str, progress: Optional[Callable[[int, int], None]] = None) -> str:
    """A manifest path for `uri`: demo://unlabelled[-N] is generated (once) and cached."""
    n = parse(uri)
    return uri if n is None else str(ensure(n, progress=progress))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=DEFAULT_N)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    m = ensure(a.n, pathlib.Path(a.out) if a.out else None)
    print(f"{a.n} unlabelled utterances -> {m} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
