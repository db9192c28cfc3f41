"""Demo test-set WER of model directories (HFEngine on CPU, greedy, jwer): the figures in docs/training.md.

    python bench/demo_wer.py assets/models/teacher assets/models/student
"""
from __future__ import annotations

import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(model_dirs: list[str]) -> None:
    from ark_ray.audio import load_audio
    from ark_ray.config import SamplingConfig
    from ark_ray.data.manifest import read_manifest
    from ark_ray.engines.hf import HFEngine
    from ark_ray.eval import jwer

    corpus = REPO / "assets" / "demo_corpus"
    rows = read_manifest(corpus / "test.jsonl")      # audio paths resolved against the corpus
    waves = [load_audio(r["audio"]) for r in rows]
    refs = [r["text"] for r in rows]
    for d in model_dirs:
        engine = HFEngine(d, device="cpu", dtype="float32")
        hyps = [t.text for t in engine.transcribe(waves, SamplingConfig(max_new_tokens=48))]
        print(json.dumps({"model": d, "test_wer": round(float(jwer(refs, hyps, normalizer="auto")), 4),
                          "n": len(refs), "examples": list(zip(refs[:3], hyps[:3]))}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or [str(REPO / "assets/models/teacher"), str(REPO / "assets/models/student")])
