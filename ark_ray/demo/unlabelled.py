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
import pathlib
import time
from typing import Callable, Optional

from ark_ray.demo.corpus import SPLIT_SIZES, demo_cache, scheme_count, speak_manifest, texts_for

SCHEME = "demo://unlabelled"
DEFAULT_N = 1000
FIRST = SPLIT_SIZES["train_sample"]   # train texts before this are the labelled split's


def cache_dir(n: int) -> pathlib.Path:
    return demo_cache() / f"unlabelled_{n}"


def parse(uri: str) -> Optional[int]:
    """`demo://unlabelled` or `demo://unlabelled-N` -> N; anything else -> None."""
    return scheme_count(uri, SCHEME, DEFAULT_N)


def ensure(n: int = DEFAULT_N, out: Optional[pathlib.Path] = None, workers: int = 4,
           progress: Optional[Callable[[int, int], None]] = None) -> pathlib.Path:
    """The manifest of the first n unlabelled utterances, generating the missing ones.
    The manifest is written last, so an interrupted run is resumed, never half-used."""
    out = out or cache_dir(n)
    texts = texts_for("train", FIRST + n)[FIRST:]
    return speak_manifest([(f"unlabelled-{i:05d}", t) for i, t in enumerate(texts)], out, "unlabelled.jsonl",
                          with_text=False, workers=workers, progress=progress)


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
