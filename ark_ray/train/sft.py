"""Supervised fine-tuning on Ray: Ray Data featurizes, the DeepSpeed learner group trains.

Also the teacher-data adaptation step: point `train_manifest` at a transcribe output and set
`text_field=pred_text`. Data order is a fixed function of (seed, epoch), so a resumed run sees
exactly the rows an uninterrupted run would, from the step it stopped at.
"""
from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Optional

import numpy as np
import ray

from ark_ray.config import SftConfig, to_dict
from ark_ray.data.featurize import featurize_rows, pad_mels
from ark_ray.data.manifest import read_manifest
from ark_ray.data.run_storage import RunStorage
from ark_ray.train.checkpoints import Checkpoints
from ark_ray.train.learner import LearnerGroup


def prepare_model(cfg: SftConfig) -> str:
    """A model directory to start from (creates a random preset model when asked)."""
    if not cfg.model.startswith("preset:"):
        return cfg.model
    from ark_ray.demo.corpus import vocabulary_texts
    from ark_ray.model.factory import save_random_model
    from ark_ray.model.tokenizer import build_tiny_tokenizer

    preset = cfg.model.split(":", 1)[1]
    out = pathlib.Path(cfg.output_dir) / "init"
    if not (out / "model.safetensors").exists():
        tok = build_tiny_tokenizer(vocabulary_texts(), vocab_size=1024) if preset == "tiny" else None
        save_random_model(out, preset, tokenizer=tok, seed=cfg.learner.seed, **cfg.model_overrides)
    return str(out)


def data_order(n_rows: int, n_needed: int, seed: int) -> np.ndarray:
    """Row indices for the whole run: epoch e is permutation(seed + e) of all rows."""
    parts, epoch = [], 0
    while sum(len(p) for p in parts) < n_needed:
        parts.append(np.random.default_rng(seed + epoch).permutation(n_rows))
        epoch += 1
    return np.concatenate(parts)[:n_needed] if parts else np.zeros(0, np.int64)


def dev_wer(group: LearnerGroup, model_dir: str, rows: list[dict], cfg: SftConfig) -> dict:
    """Greedy WER of the learner's current weights on dev rows (HF engine in the driver)."""
    from ark_ray.audio import AudioError, load_audio
    from ark_ray.config import SamplingConfig
    from ark_ray.engines.hf import HFEngine
    from ark_ray.eval import jwer

    engine = HFEngine(model_dir, device="cpu", dtype="float32")
    engine.update_weights(group.state_dict())
    refs, waves = [], []
    for r in rows[: cfg.eval_max_samples]:
        try:
            waves.append(load_audio(r["audio"], begin_time=r.get("begin_time"), end_time=r.get("end_time")))
            refs.append(r[cfg.text_field])
        except AudioError:
            continue
    hyps = [t.text for t in engine.transcribe(waves, SamplingConfig(max_new_tokens=cfg.max_new_tokens))]
    return {"dev_wer": float(jwer(refs, hyps, normalizer="auto")) if refs else float("nan"), "dev_n": len(refs),
            "example": {"ref": refs[0], "hyp": hyps[0]} if refs else {}}


def run_sft(cfg: SftConfig) -> dict:
    out_dir = pathlib.Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(cfg)
    rows = read_manifest(cfg.train_manifest, text_field=cfg.text_field, skip_bad_rows=cfg.skip_bad_rows)
    dev_rows = (read_manifest(cfg.eval_manifest, text_field=cfg.text_field, skip_bad_rows=cfg.skip_bad_rows)
                if cfg.eval_manifest else [])
    ckpts = Checkpoints(RunStorage(out_dir))   # checkpoints/step_N + latest (ark_ray/train/checkpoints.py)
    group = LearnerGroup(model_dir, cfg.learner, total_steps=cfg.steps)  # loss: token cross-entropy
    start_step = 0
    if cfg.resume and (found := ckpts.latest()) is not None:
        start_step = int(group.load_checkpoint(ckpts.storage, ckpts.dir(found))["data_step"])
        print(f"resumed from {ckpts.storage.uri_of(ckpts.dir(found))} at step {start_step}")

    def save(step: int) -> None:
        if ckpts.latest() != step:
            group.save_checkpoint(ckpts.storage, ckpts.begin(step), {"data_step": step})
            ckpts.commit(step, {"sft_state.json": {"data_step": step}})
    order = data_order(len(rows), cfg.steps * cfg.batch_size, cfg.seed)
    todo = [dict(rows[i], _pos=k) for k, i in enumerate(order)][start_step * cfg.batch_size:]
    from ark_ray.model.processor import ArkAsrProcessor
    proc = ArkAsrProcessor.from_pretrained(model_dir)

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    keep = ["audio", "begin_time", "end_time", "_pos", cfg.text_field]
    ds = ray.data.from_items([{k: r.get(k) for k in keep} for r in todo])
    ds = ds.map_batches(featurize_rows, fn_kwargs={"max_audio_s": cfg.max_audio_s},
                        batch_size=cfg.batch_size, batch_format="numpy",
                        concurrency=cfg.featurize_workers)
    metrics_f = open(out_dir / "metrics.jsonl", "a")
    summary: dict = {"error_rows": 0, "steps": start_step, "first_loss": None, "last_loss": None}
    t0 = time.time()
    step = start_step
    t_data = time.perf_counter()
    for batch in ds.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", drop_last=False,
                                 prefetch_batches=4):
        data_s = time.perf_counter() - t_data
        ok = np.array([not e for e in batch["error"]])
        summary["error_rows"] += int((~ok).sum())
        for e, a in zip(batch["error"][~ok], batch["audio"][~ok]):
            print(f"error row: {a}: {e}")
        step += 1
        if ok.any():
            mels, frames = pad_mels(batch["mel"][ok], batch["frames"][ok])
            import torch
            b = proc.collate(torch.from_numpy(mels), torch.from_numpy(frames),
                             [str(t) for t in batch[cfg.text_field][ok]], padding_side="right")
            stats = group.train_step({k: v.numpy() for k, v in b.items()})
        else:
            stats = {"loss": float("nan")}
        stats["step"] = step
        stats["data_s"] = round(data_s, 4)                          # waiting for featurized audio
        stats["step_s"] = round(time.perf_counter() - t_data - data_s, 4)  # collate + learner step
        summary["first_loss"] = summary["first_loss"] if summary["first_loss"] is not None else stats["loss"]
        summary["last_loss"] = stats["loss"]
        if cfg.eval_every and step % cfg.eval_every == 0 and dev_rows:
            stats.update(dev_wer(group, model_dir, dev_rows, cfg))
        metrics_f.write(json.dumps(stats) + "\n")
        metrics_f.flush()
        print(f"step {step}/{cfg.steps} loss {stats['loss']:.4f}"
              + (f" dev_wer {stats['dev_wer']:.3f}" if "dev_wer" in stats else ""), flush=True)
        if cfg.save_every and step % cfg.save_every == 0:
            save(step)
            if cfg.export_every_save:  # HF snapshots, e.g. to pick a less-trained demo student
                group.export_hf(str(out_dir / "snapshots" / f"step_{step}"),
                                dtype=getattr(__import__("torch"), cfg.export_dtype))
        if step >= cfg.steps:
            break
        t_data = time.perf_counter()
    save(step)
    final = group.export_hf(str(out_dir / "final"), dtype=getattr(__import__("torch"), cfg.export_dtype))
    if dev_rows:
        summary.update(dev_wer(group, model_dir, dev_rows, cfg))
    summary.update(steps=step, wall_s=time.time() - t0, final_model=final)
    (out_dir / "summary.json").write_text(json.dumps({"summary": summary, "config": to_dict(cfg)}, indent=2,
                                                     default=str))
    group.shutdown()
    return summary
