"""The OPD demo's held-out set: the first N texts of the demo corpus's test split, spoken, made on
first use and cached (`demo://heldout`, 300 clips; `demo://heldout-N`).

Why not only the 60 bundled test clips: 60 clips hold 248 words, so one evaluation reads WER with a
standard error of about 0.03 and the demo's before/after cut moved by several points between
evaluations of one run (docs/benchmarks.md). 300 clips (about 1250 words) make each read steady.
The bundled 60 are its first 60, same texts and voices (ids test-00000..., voice keyed "0:<id>"),
and, like them, no text is a train or dev text (`texts_for`).

    python -m ark_ray.demo.heldout --n 300        # what `demo://heldout` resolves to
"""
from __future__ import annotations

import argparse
import pathlib
import time
from typing import Callable, Optional

from ark_ray.demo.corpus import demo_cache, scheme_count, speak_manifest, texts_for

SCHEME = "demo://heldout"
DEFAULT_N = 300


def cache_dir(n: int) -> pathlib.Path:
    return demo_cache() / f"heldout_{n}"


def ensure(n: int = DEFAULT_N, out: Optional[pathlib.Path] = None, workers: int = 4,
           progress: Optional[Callable[[int, int], None]] = None) -> pathlib.Path:
    """The labelled manifest of the first n test-split utterances, generating the missing ones."""
    items = [(f"test-{i:05d}", t) for i, t in enumerate(texts_for("test", n))]
    return speak_manifest(items, out or cache_dir(n), "heldout.jsonl", with_text=True, workers=workers,
                          progress=progress)


def resolve(uri: str, progress: Optional[Callable[[int, int], None]] = None) -> str:
    """A manifest path for `uri`: demo://heldout[-N] is generated (once) and cached; others pass."""
    n = scheme_count(uri, SCHEME, DEFAULT_N)
    return uri if n is None else str(ensure(n, progress=progress))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=DEFAULT_N)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    m = ensure(a.n)
    print(f"{a.n} held-out utterances -> {m} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
