"""The model replica: one engine; every audio window is its own request.

vLLM (the default): the replica holds an `AsyncTranscriber` (AsyncVllmEngine). Each window the
ingress sends is submitted to vLLM's AsyncLLM the moment it arrives and awaited on its own, so
vLLM batches whatever is in flight at every decoding step (continuous batching) and a window
never waits for another to finish; `stream_window` hands tokens back as they are decoded.

HF (the fallback): transformers has no continuous batching, so windows are gathered with
`@serve.batch` into one blocking `transcribe` call in a worker thread.

Serve's `max_ongoing_requests` (windows in the engine at once) and `max_queued_requests`
(windows waiting for a replica) bound the work in flight: past them the ingress's handle call
raises `BackPressureError` and the client gets a 503 with Retry-After, not a growing queue.
Autoscaling counts the same ongoing windows.

Every result carries the replica's `model_version`, so the ingress can say which model answered
(during a rollout old and new replicas serve side by side). A rollout starts the new replicas
before it stops old ones (`max_surge_percent`), and a stopping replica finishes the windows it
holds (`graceful_shutdown_timeout_s`); a window whose replica is lost anyway is resubmitted by the
ingress (serve/windows.py).
"""
from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any, AsyncIterator

import numpy as np
from ray import serve

from ark_ray.config import EngineConfig, SamplingConfig, load_config
from ark_ray.engines import make_async_engine, make_engine


def _sampling(item: dict) -> SamplingConfig:
    return SamplingConfig(temperature=item["temperature"], max_new_tokens=item["max_new_tokens"])


#: A rollout may start this share of the target replicas (rounded up: at least one) before
#: stopping old ones, so capacity never drops, also with a single replica.
MAX_SURGE_PERCENT = 25
#: How long a stopping replica may finish the windows it holds (a window is <= 30 s of audio).
DRAIN_S = 60.0


@serve.deployment(name="ArkTranscriber", max_surge_percent=MAX_SURGE_PERCENT, graceful_shutdown_timeout_s=DRAIN_S)
class TranscriberReplica:
    def __init__(self, model_dir: str, engine: dict, max_batch_size: int, batch_wait_timeout_s: float,
                 model_version: str = ""):
        """Settings from ServeConfig (build_app passes them; no second set of defaults here)."""
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model_dir {model_dir!r} is not a directory on this node")
        self.model_version = model_version
        self.engine_cfg = load_config(EngineConfig, overrides=dict(engine))
        self.streaming = self.engine_cfg.backend == "vllm"
        if self.streaming:
            self.engine = make_async_engine(model_dir, self.engine_cfg)
        else:
            self.engine = make_engine(model_dir, self.engine_cfg)
            self._batched.set_max_batch_size(max_batch_size)
            self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def processor(self):
        """The engine's ArkAsrProcessor, so the ingress joins windows with the same decoder."""
        return self.engine.processor

    async def transcribe_window(self, item: dict) -> dict:
        """item: {samples: float32 16 kHz window, temperature, max_new_tokens, logprobs (optional)}."""
        if self.streaming:
            (result,) = await self.engine.transcribe_window(item["samples"], _sampling(item),
                                                            logprobs=item.get("logprobs", True))
        else:
            result = await self._batched(item)
        return dict(result, model_version=self.model_version)

    async def stream_window(self, item: dict) -> AsyncIterator[dict]:
        """{"delta": [token ids]} as they are decoded, then {"done": result}; the HF engine
        yields only the done result (its windows finish as a whole)."""
        if self.streaming:
            async for part in self.engine.stream_window(item["samples"], _sampling(item),
                                                        logprobs=item.get("logprobs", True)):
                if "done" in part:
                    part = {"done": dict(part["done"], model_version=self.model_version)}
                yield part
        else:
            yield {"done": dict(await self._batched(item), model_version=self.model_version)}

    # ------------------------------------------------------------------ HF fallback
    def _run(self, items: list[dict]) -> list[dict]:
        """Blocking: one engine call per distinct sampling setting in the batch, results in order."""
        out: list[Any] = [None] * len(items)
        key = lambda i: (items[i]["temperature"], items[i]["max_new_tokens"])  # noqa: E731
        for _, group in itertools.groupby(sorted(range(len(items)), key=key), key=key):
            idx = list(group)
            results = self.engine.transcribe([items[i]["samples"] for i in idx], _sampling(items[idx[0]]))
            for i, t in zip(idx, results):
                out[i] = {
                    "token_ids": list(t.token_ids),
                    "token_logprobs": None if t.token_logprobs is None else np.asarray(t.token_logprobs),
                    "prompt_ids": list(t.prompt_ids),
                    "timings": dict(t.timings, batch_size=float(len(items))),
                }
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)   # placeholders: __init__ sets ServeConfig's
    async def _batched(self, items: list[dict]) -> list[dict]:
        """The engine runs in a worker thread so the event loop keeps accepting (and batching)
        windows; @serve.batch runs one batch at a time, so the engine sees one thread."""
        return await asyncio.to_thread(self._run, items)

    def check_health(self) -> None:
        if self.engine is None or (self.streaming and not self.engine.healthy()):
            raise RuntimeError("engine closed or dead")

    def __del__(self):
        """Serve calls this when the replica stops (e.g. scaled down): free the engine's processes."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.close()
