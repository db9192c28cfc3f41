"""Where VllmEngine's time goes, in seconds per audio hour, plus a correctness self-check.

    python bench/profile_engine.py --model_dir /tmp/m06 [--seconds 10 30] [--clips 512]

1. Self-check (before any engine; GPU or CPU): the packed encoder (the one vLLM runs) against
   the HF encoder on clips of different lengths: packed batch vs padded batch vs each clip
   alone, max |delta| per backend (flash / sdpa, eager / compiled). It fails loudly (exit 3)
   if a packed output drifts beyond bf16 noise.
2. Encoder alone (same module): audio-seconds per second for padded eager, packed sdpa,
   packed flash, packed flash + torch.compile, at one batch of 30 s clips.
3. Inside vLLM (VllmEngine, ARK_PROFILE_PARTS=1): per clip length, a full run (greedy,
   3.5 tokens per audio second, the transcript length of speech), a prefill-only run
   (max_tokens=1) and a rollout-shaped run (temperature 1, top-32 log-probs):
     mel / encoder / adapter  CUDA-event time inside `embed_multimodal`
     prefill+rest            prefill-only wall - (mel + encoder + adapter)
     decode (greedy|rollout)  full wall - prefill-only wall
   and, apart, the front end's serial CPU cost per clip (vLLM's multimodal processor).
Prints one table and a JSON line; writes the log and profile.json under $OUT (or ./runs/).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from ark_ray.audio import SAMPLE_RATE  # noqa: E402

# tolerances for the self-check: fp32 must agree to float noise, bf16/fp16 to a few ulps of the
# activations after 32 layers (the HF padded batch itself differs from one clip alone that much)
TOL = {"float32": 2e-3, "bfloat16": 0.25, "float16": 0.1}


def clips(n: int, seconds: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32) for _ in range(n)]


def out_dir() -> pathlib.Path:
    d = pathlib.Path(os.environ.get("OUT") or "runs/profile_engine")
    d.mkdir(parents=True, exist_ok=True)
    return d


def load_encoder(model_dir: str, device, dtype):
    """The checkpoint's audio encoder as PackedArkAudioEncoder (only `audio_encoder.*` is read)."""
    import torch
    from safetensors import safe_open

    from ark_ray.model.config import ArkAsrConfig
    from ark_ray.vllm_plugin.encoder import PackedArkAudioEncoder

    cfg = ArkAsrConfig.from_pretrained(model_dir)
    enc = PackedArkAudioEncoder(cfg, attention="auto")
    prefix = "audio_encoder."
    state = {}
    for f in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                if k.startswith(prefix):
                    state[k[len(prefix):]] = sf.get_tensor(k)
    missing, unexpected = enc.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "embed_positions" not in m]:
        raise RuntimeError(f"encoder weights: missing {missing}, unexpected {unexpected}")
    return enc.to(device, dtype).eval(), cfg


def variants(enc, device):
    """(name, attention, compile) for every packed variant this machine can run."""
    from ark_ray.vllm_plugin.encoder import _flash_fn

    out = [("packed-sdpa", "sdpa", False)]
    if device.type == "cuda" and _flash_fn() is not None:
        out.append(("packed-flash", "flash", False))
        out.append(("packed-flash+compile", "flash", True))
    elif device.type == "cuda":
        out.append(("packed-sdpa+compile", "sdpa", True))
    return out


def with_variant(enc, attention: str, compile: bool):
    """The same encoder module (shared weights) re-set to another attention/compile choice."""
    from ark_ray.vllm_plugin.encoder import _attn_in, _attn_out_ffn

    enc.attention, enc.want_compile = attention, compile
    enc._attn_fn, enc._pre, enc._post, enc._compiled = None, _attn_in, _attn_out_ffn, False
    return enc


def self_check(enc, cfg, device, dtype_name: str) -> dict:
    """Packed vs padded vs alone on 6 clips of 0.3-30 s; max |delta| per variant."""
    import torch

    from ark_ray.audio import log_mel
    from ark_ray.model.config import audio_token_count
    from ark_ray.model.modeling import ArkAudioEncoder

    rng = np.random.default_rng(3)
    secs = [30.0, 0.3, 7.1, 12.34, 29.9, 3.0]
    waves = [(0.1 * rng.standard_normal(int(s * SAMPLE_RATE))).astype(np.float32) for s in secs]
    res = {}
    with torch.inference_mode():
        mel, frames = log_mel(waves, device=device)
        mel = mel.to(enc.whisper.conv1.weight.dtype)
        fr = frames.tolist()
        counts = [audio_token_count(n, cfg.merge_factor) for n in fr]
        padded = ArkAudioEncoder.forward(enc, mel, frames).float()
        alone = torch.cat([ArkAudioEncoder.forward(enc, log_mel([w], device=device)[0].to(mel.dtype)).float()
                           for w in waves])
        scale = float(padded.abs().max())
        res["padded_vs_alone"] = float((padded - alone).abs().max())
        for name, attn, comp in variants(enc, device):
            with_variant(enc, attn, comp)
            t0 = time.perf_counter()
            got = enc.forward_packed(mel, fr).float()
            if device.type == "cuda":
                torch.cuda.synchronize()
            res[name] = {"vs_padded": float((got - padded).abs().max()),
                         "vs_alone": float((got - alone).abs().max()),
                         "backend": getattr(enc, "backend", "?"), "compiled": enc._compiled,
                         "first_call_s": round(time.perf_counter() - t0, 1)}
            assert got.shape[0] == sum(counts)
    res["scale"] = scale
    res["tolerance"] = TOL[dtype_name] * max(1.0, scale / 10)
    # a packing bug (wrong positions, cu_seqlens or merge) is off by the order of `scale`; rounding
    # noise is of the order of what the HF padded batch itself shows against one clip alone
    limit = max(res["tolerance"], 3 * res["padded_vs_alone"])
    res["ok"] = all(v["vs_alone"] <= limit for v in res.values() if isinstance(v, dict))
    return res


def encoder_speed(enc, cfg, device, n_clips: int, seconds: float, repeats: int = 3) -> dict:
    """Audio-seconds per second of the encoder + adapter alone, one batch of equal clips."""
    import torch

    from ark_ray.audio import log_mel
    from ark_ray.model.modeling import ArkAudioEncoder

    waves = clips(n_clips, seconds, 5)
    out = {}
    with torch.inference_mode():
        mel, frames = log_mel(waves, device=device)
        mel = mel.to(enc.whisper.conv1.weight.dtype)
        fr = frames.tolist()
        runs = [("padded-eager(HF)", None, None)] + variants(enc, device)
        for name, attn, comp in runs:
            if attn is None:
                fn = lambda: ArkAudioEncoder.forward(enc, mel, frames)  # noqa: E731
            else:
                with_variant(enc, attn, comp)
                fn = lambda: enc.forward_packed(mel, fr)  # noqa: E731
            fn()  # warm-up (compiles)
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            sync()
            out[name] = round(n_clips * seconds * repeats / (time.perf_counter() - t0), 1)
    return out


def front_end_cost(model_dir: str, waves: list[np.ndarray]) -> float | None:
    """Seconds of vLLM's multimodal processor (front end, one CPU thread) per clip."""
    try:
        from vllm.config import ModelConfig
        from vllm.multimodal import MULTIMODAL_REGISTRY

        import ark_ray.vllm_plugin as plugin
        from ark_ray.model.processor import ArkAsrProcessor

        plugin.register()
        mc = ModelConfig(model=model_dir, max_model_len=640, limit_mm_per_prompt={"audio": 1})
        proc = MULTIMODAL_REGISTRY.create_processor(mc)
        prompt = ArkAsrProcessor.from_pretrained(model_dir).prompt_ids(1)
        proc(prompt, proc.info.parse_mm_data({"audio": [waves[0]]}))
        t0 = time.perf_counter()
        for w in waves:
            proc(prompt, proc.info.parse_mm_data({"audio": [w]}))
        return (time.perf_counter() - t0) / len(waves)
    except Exception as err:  # noqa: BLE001  (another vLLM layout: report, do not fail the profile)
        print(f"front-end cost not measured: {type(err).__name__}: {err}", flush=True)
        return None


def engine_profile(model_dir: str, seconds: list[float], n_clips: int, cfg_over: dict) -> list[dict]:
    from ark_ray.config import EngineConfig, SamplingConfig
    from ark_ray.engines.vllm_engine import VllmEngine
    from ark_ray.vllm_plugin.profiling import collect_parts, encoder_info

    os.environ["ARK_PROFILE_PARTS"] = "1"
    cfg = EngineConfig(backend="vllm", **{"max_num_seqs": 256, "max_model_len": 640, **cfg_over})
    t0 = time.perf_counter()
    eng = VllmEngine(model_dir, cfg)
    start_s = time.perf_counter() - t0
    rows = []
    try:
        for s in seconds:
            new = int(round(3.5 * s))
            eng.transcribe(clips(16, s, 1), SamplingConfig(max_new_tokens=new))  # warm-up
            eng.llm.collective_rpc(collect_parts)
            audio = clips(n_clips, s)
            hours = n_clips * s / 3600
            runs = {}
            for name, sp in (("full", SamplingConfig(max_new_tokens=new)),
                             ("prefill", SamplingConfig(max_new_tokens=1)),
                             ("rollout", SamplingConfig(max_new_tokens=new, temperature=1.0, logprobs_topk=32,
                                                        seed=0))):
                t = time.perf_counter()
                eng.transcribe(audio, sp)
                wall = time.perf_counter() - t
                parts = eng.llm.collective_rpc(collect_parts)[0]
                runs[name] = (wall, parts)
            wall_f, parts_f = runs["full"]
            wall_p, parts_p = runs["prefill"]
            enc_parts = {k: parts_p.get(k, {}).get("s", 0.0) for k in ("mel", "encoder", "adapter")}
            per_h = lambda x: round(x / hours, 3)  # noqa: E731
            row = {"clip_s": s, "clips": n_clips, "x_real_time": round(n_clips * s / wall_f, 1),
                   "rollout_x_real_time": round(n_clips * s / runs["rollout"][0], 1),
                   "s_per_audio_h": {
                       **{k: per_h(v) for k, v in enc_parts.items()},
                       "prefill+rest": per_h(wall_p - sum(enc_parts.values())),
                       "decode": per_h(wall_f - wall_p),
                       "decode_rollout": per_h(runs["rollout"][0] - wall_p),
                       "total": per_h(wall_f), "total_rollout": per_h(runs["rollout"][0])},
                   "encoder_steps": parts_p.get("steps"), "clips_per_encoder_step":
                       round(parts_p.get("clips", 0) / max(1, parts_p.get("steps", 1)), 1),
                   "encoder_full_run_s_per_h": per_h(sum(parts_f.get(k, {}).get("s", 0.0)
                                                         for k in ("mel", "encoder", "adapter")))}
            rows.append(row)
            print(json.dumps(row), flush=True)
        info = eng.llm.collective_rpc(encoder_info)[0]
    finally:
        eng.close()
    for r in rows:
        r["engine_start_s"], r["encoder"] = round(start_s, 1), info
    return rows


def table(rows: list[dict], fe: float | None) -> str:
    keys = ["mel", "encoder", "adapter", "prefill+rest", "decode", "total", "decode_rollout", "total_rollout"]
    lines = ["s per audio hour | " + " | ".join(f"{r['clip_s']:g} s clips" for r in rows)]
    for k in keys:
        lines.append(f"{k:16s} | " + " | ".join(f"{r['s_per_audio_h'][k]:.3f}" for r in rows))
    if fe is not None:
        lines.append(f"{'front end (CPU)':16s} | " + " | ".join(f"{fe * 3600 / r['clip_s']:.3f}" for r in rows))
    lines.append(f"{'x real time':16s} | " + " | ".join(f"{r['x_real_time']:.0f} (rollout "
                                                        f"{r['rollout_x_real_time']:.0f})" for r in rows))
    lines.append(f"{'clips/enc step':16s} | " + " | ".join(str(r["clips_per_encoder_step"]) for r in rows))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--seconds", type=float, nargs="+", default=[10.0, 30.0])
    ap.add_argument("--clips", type=int, default=512)
    ap.add_argument("--encoder_batch", type=int, default=32, help="30 s clips per batch, encoder-alone speed")
    ap.add_argument("--skip_engine", action="store_true", help="self-check and encoder speed only")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="EngineConfig overrides, e.g. encoder_attention=padded encoder_compile=false")
    args = ap.parse_args()
    import torch

    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}

    enc, cfg = load_encoder(args.model_dir, device, getattr(torch, dtype_name))
    report["self_check"] = check = self_check(enc, cfg, device, dtype_name)
    print("SELF-CHECK", json.dumps(check), flush=True)
    if not check["ok"]:
        print("SELF-CHECK FAILED: the packed encoder differs from the HF encoder beyond tolerance", flush=True)
        sys.exit(3)
    report["encoder_alone_audio_s_per_s"] = speed = encoder_speed(enc, cfg, device, args.encoder_batch, 30.0)
    print("ENCODER ALONE (audio-s/s, 30 s clips)", json.dumps(speed), flush=True)
    del enc
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if not args.skip_engine:
        from bench.transcribe_engine import parse_set

        over = parse_set(args.set)
        fe = front_end_cost(args.model_dir, clips(32, 10.0, 9))
        rows = engine_profile(args.model_dir, args.seconds, args.clips, over)
        report.update(engine=rows, front_end_s_per_clip=fe, overrides=over)
        print(table(rows, fe), flush=True)
    (out_dir() / "profile.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in report if k not in ("engine",)}))


if __name__ == "__main__":
    main()
