"""The model replica: one `Transcriber` (VllmEngine by default, HFEngine as fallback) behind @serve.batch.

Requests arrive one audio window (<= max_chunk_s) at a time from the ingress; `@serve.batch`
gathers the windows of concurrent requests (and of one long request) into one `transcribe`
call, which is where the engine gets its throughput. Serve's `max_ongoing_requests` and
`max_queued_requests` on this deployment bound the work in flight: past them, the ingress's
handle call raises `BackPressureError` and the client gets a 503 instead of a growing queue.
"""
from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any

import numpy as np
from ray import serve

from ark_ray.config import EngineConfig, SamplingConfig, load_config
from ark_ray.engines import make_engine


@serve.deployment(name="ArkTranscriber")
class TranscriberReplica:
    def __init__(self, model_dir: str, engine: dict, max_batch_size: int = 16,
                 batch_wait_timeout_s: float = 0.01):
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model_dir {model_dir!r} is not a directory on this node")
        self.engine_cfg = load_config(EngineConfig, overrides=dict(engine))
        self.engine = make_engine(model_dir, self.engine_cfg)
        self.transcribe_window.set_max_batch_size(max_batch_size)
        self.transcribe_window.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def processor(self):
        """The engine's ArkAsrProcessor, so the ingress joins windows with the same decoder."""
        return self.engine.processor

    def _run(self, items: list[dict]) -> list[dict]:
        """Blocking: one engine call per distinct sampling setting in the batch, results in order."""
        out: list[Any] = [None] * len(items)
        key = lambda i: (items[i]["temperature"], items[i]["max_new_tokens"])  # noqa: E731
        for (temperature, max_new), group in itertools.groupby(sorted(range(len(items)), key=key), key=key):
            idx = list(group)
            sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new)
            results = self.engine.transcribe([items[i]["samples"] for i in idx], sampling)
            for i, t in zip(idx, results):
                out[i] = {
                    "token_ids": list(t.token_ids),
                    "token_logprobs": None if t.token_logprobs is None else np.asarray(t.token_logprobs),
                    "prompt_ids": list(t.prompt_ids),
                    "timings": dict(t.timings, batch_size=float(len(items))),
                }
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def transcribe_window(self, items: list[dict]) -> list[dict]:
        """Each item: {samples: float32 16 kHz window, temperature, max_new_tokens}.

        The engine runs in a worker thread so the replica's event loop keeps accepting (and
        batching) requests meanwhile; @serve.batch runs one batch at a time, so the engine
        is never used from two threads at once.
        """
        return await asyncio.to_thread(self._run, items)

    def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError("engine closed")
