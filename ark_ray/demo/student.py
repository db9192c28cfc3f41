"""The OPD demo's student: the bundled teacher with its feed-forward blocks pruned to a quarter.

Prune, then distil (Minitron, Muralidharan et al. 2024; Sheared-LLaMA): every decoder MLP keeps
the 128 of its 512 hidden units, and every encoder FFN the 192 of its 768, that carry the most
weight (product of the norms of each unit's input rows and output column); attention, embeddings
and the adapter are the teacher's. The result (1.85 M parameters against the teacher's 2.73 M,
smaller than the old 1.89 M student) is of the teacher's family and vocabulary, has never been
trained as it stands, and transcribes at held-out WER ~0.68 against the teacher's 0.36: a gap
that distillation on unlabelled audio closes. Made from the teacher on first use (deterministic,
well under a second), cached under runs/demo_cache; nothing is shipped.

    python -m ark_ray.demo.student          # prints where `demo://student` lives
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil

from ark_ray.demo.corpus import REPO, demo_cache

SCHEME = "demo://student"
TEACHER = REPO / "assets" / "models" / "teacher"
DECODER_MLP = 128    # of the teacher's intermediate_size 512
ENCODER_FFN = 192    # of the teacher's encoder_ffn_dim 768


def cache_dir() -> pathlib.Path:
    """Keyed by the teacher's weights and the widths kept: a new teacher makes a new student."""
    h = hashlib.sha256((TEACHER / "model.safetensors").read_bytes())
    h.update(repr((DECODER_MLP, ENCODER_FFN)).encode())
    return demo_cache() / f"student_pruned_{h.hexdigest()[:12]}"


def prune_ffn(src: str | os.PathLike, dst: str | os.PathLike, decoder_mlp: int, encoder_ffn: int) -> pathlib.Path:
    """Copy an ARK-ASR directory keeping the strongest `decoder_mlp` hidden units of every decoder
    MLP and `encoder_ffn` of every encoder FFN (same order as in the teacher)."""
    import torch
    from safetensors.torch import load_file, save_file

    src, dst = pathlib.Path(src), pathlib.Path(dst)
    tmp = dst.with_name(dst.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    sd = load_file(src / "model.safetensors")
    cfg = json.loads((tmp / "config.json").read_text())
    out = dict(sd)

    def keep(score: torch.Tensor, k: int) -> torch.Tensor:
        return score.topk(k).indices.sort().values

    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp."
        g, u, d = (sd[p + n].float() for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
        idx = keep(g.norm(dim=1) * u.norm(dim=1) * d.norm(dim=0), decoder_mlp)
        for n in ("gate_proj.weight", "up_proj.weight"):
            out[p + n] = sd[p + n][idx].contiguous()
        out[p + "down_proj.weight"] = sd[p + "down_proj.weight"][:, idx].contiguous()
    for i in range(cfg["whisper_config"]["encoder_layers"]):
        p = f"audio_encoder.whisper.layers.{i}."
        idx = keep(sd[p + "fc1.weight"].float().norm(dim=1) * sd[p + "fc2.weight"].float().norm(dim=0), encoder_ffn)
        out[p + "fc1.weight"] = sd[p + "fc1.weight"][idx].contiguous()
        out[p + "fc1.bias"] = sd[p + "fc1.bias"][idx].contiguous()
        out[p + "fc2.weight"] = sd[p + "fc2.weight"][:, idx].contiguous()
    save_file(out, tmp / "model.safetensors", metadata={"format": "pt"})
    cfg["intermediate_size"] = decoder_mlp
    cfg["whisper_config"]["encoder_ffn_dim"] = encoder_ffn
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def ensure() -> pathlib.Path:
    d = cache_dir()
    if not (d / "model.safetensors").exists():
        prune_ffn(TEACHER, d, DECODER_MLP, ENCODER_FFN)
    return d


def resolve(uri: str) -> str:
    return str(ensure()) if uri == SCHEME else uri


if __name__ == "__main__":
    print(ensure())
