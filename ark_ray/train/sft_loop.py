"""What every SFT learner rank runs: Ray Train's `train_loop_per_worker` around one `LearnerWorker`.

Each Ray Train worker is one torch.distributed rank (Ray Train's TorchConfig made the process
group; the `LearnerWorker` of ark_ray/train/learner.py joins it with DeepSpeed: ZeRO, fp32 master
weights and bf16 on GPU, gloo and fp32 on CPU, the loss normalised by the whole batch's tokens).
The loop:

1. restores the last checkpoint Ray Train hands it (`ray.train.get_checkpoint()`, in the run's
   storage: this rank fetches its own ZeRO shards and the shared files, and the data step), or
   starts from the model;
2. reads its own dataset shard (`ray.train.get_dataset_shard("train")`, built by
   ark_ray/train/sft_input.py), one step's rows per batch, checking every position;
3. trains (`LearnerWorker.train_shard`), and rank 0 sends each step's record (loss, positions,
   ids, error rows, timings) to the driver's event queue; every `eval_every` steps rank 0 scores
   the eval set with an HFEngine holding the current weights;
4. every `save_every` steps and at the end: each rank saves its DeepSpeed shards to a local folder
   and `ray.train.report(checkpoint=...)` uploads them into one checkpoint folder of the run's
   storage (`output_dir/checkpoints/step_N`); Ray Train's controller records it (its snapshot file
   is the `latest` pointer, written after the upload), and the ranks wait for that before going on;
5. at the end rank 0 exports the HF model to `output_dir/final` and scores it.

A rank lost with its node ends every rank's collectives; Ray Train restarts the whole group
(`max_failures`) and this loop begins again at 1.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tempfile
import time
from dataclasses import asdict
from typing import Optional

import numpy as np
import ray
import torch

from ark_ray.audio import N_MELS
from ark_ray.data.featurize import pad_mels
from ark_ray.data.run_storage import RunStorage
from ark_ray.train.learner import LearnerWorker, export_hf
from ark_ray.train.sft_input import POS, step_batches

#: Frames of the stand-in clip a rank trains (with weight 0) when none of its rows this step is usable.
_STAND_IN_FRAMES = 16


def model_on_this_node(model: dict, storage: RunStorage) -> str:
    """A local directory holding the model to start from. `model` is {"dir": path} (a folder every
    node has) or {"run": rel} (a folder of the run's storage, fetched once per process here when
    the storage is remote)."""
    if "dir" in model:
        return model["dir"]
    if storage.is_local:
        return storage.path(model["run"])
    key = hashlib.sha1(storage.uri_of(model["run"]).encode()).hexdigest()[:16]
    dst = os.path.join(tempfile.gettempdir(), "ark-ray-models", key)
    if not os.path.isfile(os.path.join(dst, "config.json")):
        tmp = tempfile.mkdtemp(prefix=f"{key}-", dir=os.path.dirname(dst) if os.path.isdir(os.path.dirname(dst))
                               else None)
        storage.download_dir(model["run"], tmp)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.rename(tmp, dst)        # another rank of this node may have won: keep its copy
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def export_to(storage: RunStorage, rel: str, model_dir: str, state_dict: dict, dtype: str) -> str:
    """The HF export of `state_dict` at `rel` in the run's storage; its URI."""
    if storage.is_local:
        export_hf(model_dir, state_dict, storage.path(rel), getattr(torch, dtype))
        return storage.uri_of(rel)
    tmp = tempfile.mkdtemp(prefix="ark-sft-export-")
    try:
        export_hf(model_dir, state_dict, tmp, getattr(torch, dtype))
        storage.upload_dir(tmp, rel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return storage.uri_of(rel)


class DevEval:
    """Greedy WER of the learner's current weights on the first eval rows (rank 0, in-process)."""

    def __init__(self, model_dir: str, rows: list[dict], text_field: str, max_new_tokens: int, device):
        from ark_ray.audio import AudioError, load_audio
        from ark_ray.engines.hf import HFEngine

        self.engine = HFEngine(model_dir, device=str(device), dtype="float32" if device.type == "cpu" else "auto")
        self.max_new_tokens = max_new_tokens
        self.refs, self.waves = [], []
        for r in rows:
            try:
                self.waves.append(load_audio(r["audio"], begin_time=r.get("begin_time"), end_time=r.get("end_time")))
                self.refs.append(r[text_field])
            except AudioError:
                continue

    def __call__(self, state_dict: dict) -> dict:
        from ark_ray.config import SamplingConfig
        from ark_ray.eval import jwer

        self.engine.update_weights(state_dict)
        hyps = [t.text for t in self.engine.transcribe(self.waves, SamplingConfig(max_new_tokens=self.max_new_tokens))]
        if not self.refs:
            return {"dev_wer": float("nan"), "dev_n": 0}
        return {"dev_wer": float(jwer(self.refs, hyps, normalizer="auto")), "dev_n": len(self.refs),
                "example": {"ref": self.refs[0], "hyp": hyps[0]}}


def _collate(proc, batch: dict, ok: np.ndarray, text_field: str) -> tuple[dict, float]:
    """This rank's learner batch from its usable rows; a silent stand-in row (weight 0) when it has
    none, so it still takes part in the step's collectives."""
    if ok.any():
        mels, frames = pad_mels(batch["mel"][ok], batch["frames"][ok])
        texts, weight = [str(t) for t in batch[text_field][ok]], 1.0
    else:
        mels, frames = np.zeros((1, N_MELS, _STAND_IN_FRAMES), np.float32), np.array([_STAND_IN_FRAMES])
        texts, weight = [""], 0.0
    b = proc.collate(torch.from_numpy(mels), torch.from_numpy(frames), texts, padding_side="right")
    return {k: v.numpy() for k, v in b.items()}, weight


def _gather(obj) -> list:
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def train_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker for SFT (config: see `ark_ray.train.sft.build_trainer`)."""
    import ray.train
    from ray.train import Checkpoint

    from ark_ray.model.processor import ArkAsrProcessor

    cfg, storage, events = config["cfg"], config["storage"], config["events"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t_start = time.time()
    model_dir = model_on_this_node(config["model"], storage)
    learner = LearnerWorker(model_dir, asdict(cfg.learner), cfg.steps)
    proc = ArkAsrProcessor.from_pretrained(model_dir)

    after = 0
    restored = ray.train.get_checkpoint()
    if restored is not None:   # this rank's ZeRO shards and the shared files only
        after = int(learner.download_checkpoint(storage, posixpath.relpath(restored.path, storage.root))["data_step"])
    nodes = _gather(ray.get_runtime_context().get_node_id())
    if rank == 0:
        events.put({"event": "start", "after_step": after, "nodes": nodes, "t": time.time(),
                    "startup_s": round(time.time() - t_start, 2)})

    evaluate: Optional[DevEval] = None
    if rank == 0 and config.get("eval_rows") is not None:
        evaluate = DevEval(model_dir, config["eval_rows"], cfg.text_field, cfg.max_new_tokens, learner.device)

    def save(step: int) -> None:
        tmp = tempfile.mkdtemp(prefix=f"ark-sft-ckpt-r{rank}-")
        try:
            learner.save_checkpoint(tmp, {"data_step": step})
            ray.train.report({"data_step": step}, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"step_{step}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # until Ray Train's controller has taken the report in, a restart would go back to the
        # checkpoint before: wait for that, so "checkpoint" means what a restart restores
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        if rank == 0:
            events.put({"event": "checkpoint", "step": step, "t": time.time()})
        if cfg.export_every_save and step < cfg.steps:   # HF snapshots, e.g. to pick a less-trained demo student
            sd = learner.state_dict()
            if rank == 0:
                export_to(storage, f"snapshots/step_{step}", model_dir, sd, cfg.export_dtype)

    saved = after
    shard = ray.train.get_dataset_shard("train")
    t_data = time.perf_counter()
    for step, batch in step_batches(shard, rank, world, cfg.batch_size, cfg.steps, after):
        data_s = time.perf_counter() - t_data
        errors = np.array([bool(e) for e in batch["error"]])
        mine = {"pos": batch[POS].tolist(), "id": [str(i) for i in batch["id"]],
                "bad": [{"id": str(i), "audio": str(a), "error": str(e)}
                        for i, a, e in zip(batch["id"][errors], batch["audio"][errors], batch["error"][errors])]}
        parts = _gather(mine)
        learner_batch, weight = _collate(proc, batch, ~errors, cfg.text_field)
        if any(len(p["pos"]) > len(p["bad"]) for p in parts):
            stats = learner.train_shard(learner_batch, weight)
        else:   # no rank has a usable row: no learner step
            stats = {"loss": float("nan")}
        rec = dict(stats, step=step)
        if rank == 0:
            order = sorted((p, i) for part in parts for p, i in zip(part["pos"], part["id"]))
            bad = [b for part in parts for b in part["bad"]]
            rec.update(positions=[order[0][0], order[-1][0] + 1], ids=[i for _, i in order],
                       error_rows=len(bad), samples=len(order) - len(bad), data_s=round(data_s, 4))
            if bad:
                rec["errors"] = bad
        want_eval = bool(cfg.eval_every and step % cfg.eval_every == 0 and config.get("eval_rows") is not None)
        if want_eval:
            sd = learner.state_dict()                 # every rank: a collective under ZeRO-3
            if rank == 0:
                rec.update(evaluate(sd))
        if rank == 0:
            rec["step_s"] = round(time.perf_counter() - t_data - data_s, 4)
            events.put({"event": "step", **rec})
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save(step)
            saved = step
        t_data = time.perf_counter()

    if saved < cfg.steps:
        save(cfg.steps)
    sd = learner.state_dict()
    if rank == 0:
        final = {"event": "final", "final_model": export_to(storage, "final", model_dir, sd, cfg.export_dtype)}
        if evaluate is not None:
            final.update(evaluate(sd))
        events.put(final)
