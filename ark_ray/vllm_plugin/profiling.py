"""Where the engine's time goes: per-part timers inside the vLLM worker, read back over RPC.

Off unless the environment has `ARK_PROFILE_PARTS=1` when the engine starts (vLLM's engine
and worker processes inherit it). Then `embed_multimodal` brackets the log-mel, the encoder
(conv stem + layers) and the adapter with CUDA events (perf_counter on the CPU); the events are
only resolved when `collect_parts` runs, so profiling adds no sync to the step.

    llm.collective_rpc(collect_parts)  ->  [{"mel": {"s": .., "calls": ..}, ..., "clips": ..}]

The decoder's prefill and decode run under vLLM's CUDA graphs, where a Python hook never runs;
bench/profile_engine.py gets them from whole runs instead (see there).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch

ENV = "ARK_PROFILE_PARTS"


def enabled() -> bool:
    return os.environ.get(ENV, "0") not in ("", "0", "false", "False")


class PartTimer:
    """Accumulates (start, end) pairs per named part; resolves them on `collect`."""

    def __init__(self):
        self.pending: list[tuple[str, object, object]] = []
        self.totals: dict[str, list[float]] = {}
        self.counts = {"clips": 0, "mel_frames": 0, "steps": 0}

    @contextmanager
    def part(self, name: str):
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self.pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.pending.append((name, t0, time.perf_counter()))

    def count(self, clips: int, mel_frames: int) -> None:
        self.counts["clips"] += clips
        self.counts["mel_frames"] += mel_frames
        self.counts["steps"] += 1

    def collect(self, reset: bool = True) -> dict:
        if any(not isinstance(s, float) for _, s, _ in self.pending):
            torch.cuda.synchronize()
        for name, s, e in self.pending:
            sec = (e - s) if isinstance(s, float) else s.elapsed_time(e) / 1000.0
            tot = self.totals.setdefault(name, [0.0, 0])
            tot[0] += sec
            tot[1] += 1
        self.pending = []
        out = {k: {"s": v[0], "calls": v[1]} for k, v in self.totals.items()}
        out.update(self.counts)
        if reset:
            self.totals = {}
            self.counts = {k: 0 for k in self.counts}
        return out


def _model_of(worker):
    for owner in (worker, getattr(worker, "worker", None), getattr(worker, "model_runner", None)):
        if owner is not None and hasattr(owner, "get_model"):
            try:
                return owner.get_model()
            except Exception:  # noqa: BLE001  (not initialised on this path)
                pass
    runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
    return runner.model


def collect_parts(worker, reset: bool = True) -> dict:
    """Runs in each vLLM worker (collective_rpc): the plugin model's part totals since the last call."""
    timer = getattr(_model_of(worker), "part_timer", None)
    return timer.collect(reset) if timer is not None else {}


def encoder_info(worker) -> dict:
    """Runs in each vLLM worker: how the encoder runs there (backend, compiled)."""
    enc = getattr(_model_of(worker), "audio_encoder", None)
    return {"impl": getattr(enc, "attention", "?"), "backend": getattr(enc, "backend", "not yet run"),
            "compiled": bool(getattr(enc, "_compiled", False)),
            "dtype": str(next(enc.parameters()).dtype) if enc is not None else "?"}
