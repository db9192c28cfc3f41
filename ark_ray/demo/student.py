"""The OPD demo's student: the bundled teacher cut to its encoder and first decoder layer.

Distil-Whisper's student recipe (Gandhi et al., 2023): keep the teacher's encoder, keep a subset
of its decoder layers, then distil. The cut model is of the teacher's family and vocabulary, has
never been trained as it stands (held-out WER ~1.5: it loops and misspells), and already hears
what the teacher hears, so distillation on unlabelled audio has a large, quick gain to show.
It is made from the teacher on first use (deterministic, ~0.1 s) and cached; nothing is shipped.

    python -m ark_ray.demo.student          # prints where `demo://student` lives
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
from typing import Sequence

from ark_ray.demo.corpus import REPO

SCHEME = "demo://student"
TEACHER = REPO / "assets" / "models" / "teacher"
ENCODER_LAYERS = (0, 1)   # all of the teacher's
DECODER_LAYERS = (0,)     # the first of its two


def cache_dir() -> pathlib.Path:
    """Keyed by the teacher's weights and the layers kept: a new teacher makes a new student."""
    root = pathlib.Path(os.environ.get("ARK_DEMO_CACHE", REPO / "runs" / "demo_cache"))
    h = hashlib.sha256((TEACHER / "model.safetensors").read_bytes())
    h.update(repr((ENCODER_LAYERS, DECODER_LAYERS)).encode())
    return root / f"student_cut_{h.hexdigest()[:12]}"


def cut_layers(src: str | os.PathLike, dst: str | os.PathLike, encoder_layers: Sequence[int],
               decoder_layers: Sequence[int]) -> pathlib.Path:
    """Copy an ARK-ASR directory keeping only the given encoder / decoder layers (renumbered)."""
    from safetensors.torch import load_file, save_file

    src, dst = pathlib.Path(src), pathlib.Path(dst)
    tmp = dst.with_name(dst.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    keep = {"audio_encoder.whisper.layers": list(encoder_layers), "model.layers": list(decoder_layers)}
    out = {}
    for name, t in load_file(src / "model.safetensors").items():
        m = re.match(r"(audio_encoder\.whisper\.layers|model\.layers)\.(\d+)\.(.*)", name)
        if not m:
            out[name] = t
        elif int(m.group(2)) in keep[m.group(1)]:
            out[f"{m.group(1)}.{keep[m.group(1)].index(int(m.group(2)))}.{m.group(3)}"] = t
    save_file(out, tmp / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["num_hidden_layers"] = len(decoder_layers)
    if "layer_types" in cfg:
        cfg["layer_types"] = [cfg["layer_types"][i] for i in decoder_layers]
    cfg["whisper_config"]["encoder_layers"] = len(encoder_layers)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def ensure() -> pathlib.Path:
    d = cache_dir()
    if not (d / "model.safetensors").exists():
        cut_layers(TEACHER, d, ENCODER_LAYERS, DECODER_LAYERS)
    return d


def resolve(uri: str) -> str:
    return str(ensure()) if uri == SCHEME else uri


if __name__ == "__main__":
    print(ensure())
