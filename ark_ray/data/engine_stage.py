"""The transcriber's engine stage: a Ray Data actor-pool UDF, decoded rows in, transcripts out,
the engine never left idle.

Why a threaded actor with a feeder: Ray Data hands each engine actor several blocks at once
(`max_concurrent_calls_per_actor`, each call a thread of the actor). For vLLM, one feeder thread
owns the engine: it adds every waiting clip as a request as soon as a call hands it over and
pulls finished outputs, so vLLM's continuous batching always has work queued while the next
blocks are being decoded, transferred and written (no batch-sized barrier, no tail of a
half-empty last step per call). The HF engine is synchronous: calls take turns.

Engines that share a GPU build one after another (a file lock per GPU): vLLM sizes its KV
cache from the card's free-memory drop during profiling, so two engines profiling at once
count each other's allocations and one of them ends with no cache blocks.

If the engine dies under a call, the actor exits: Ray Data restarts it (on any node) and retries
the calls it had, which the keyed part files make harmless.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import queue
import threading
import time
from typing import Optional

import numpy as np
import pyarrow as pa

from ark_ray.audio import AudioError
from ark_ray.config import EngineConfig, SamplingConfig
from ark_ray.data import job_events
from ark_ray.data.decode_stage import WAVE, set_columns, waves_of

#: Columns the engine stage adds (the decode stage's `wave` leaves here).
SEGMENT = pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()), ("text", pa.string())])
ADDED = {"pred_text": pa.string(), "pred_text_raw": pa.string(), "segments": pa.list_(SEGMENT)}


@contextlib.contextmanager
def gpu_start_lock():
    """Hold an exclusive lock per visible GPU (same node) while an engine starts."""
    ids = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if not ids:
        yield
        return
    import fcntl

    path = f"/tmp/ark-engine-start-gpu{ids.replace(',', '_')}.lock"
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Pending:
    """The results of one call's requests, filled in by the feeder thread."""

    def __init__(self, n: int):
        self.results: list = [None] * n
        self.left = n
        self.done = threading.Event()
        if n == 0:
            self.done.set()

    def set(self, i: int, value) -> None:
        self.results[i] = value
        self.left -= 1
        if self.left == 0:
            self.done.set()


class VllmFeeder:
    """One thread drives vLLM's LLMEngine: add requests as calls arrive, step while any run.

    Every engine call happens on this thread (LLMEngine is not thread-safe); vLLM's engine core
    runs in its own process and keeps the GPU busy while this thread adds or collects.
    """

    def __init__(self, engine):
        self.llm_engine = engine.llm.llm_engine
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: dict[str, tuple[_Pending, int]] = {}
        self.ids = itertools.count()
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._loop, name="vllm-feeder", daemon=True)
        self.thread.start()

    def generate(self, prompts: list, params) -> list:
        """RequestOutput (or the exception) per prompt, in order; blocks until all are done."""
        from vllm.sampling_params import RequestOutputKind

        if self.error is not None:
            raise RuntimeError(f"vLLM feeder stopped: {self.error!r}")
        params = params.clone() if hasattr(params, "clone") else params
        params.output_kind = RequestOutputKind.FINAL_ONLY   # no per-step partial outputs to build
        pending = _Pending(len(prompts))
        self.inbox.put((prompts, params, pending))
        while not pending.done.wait(timeout=5.0):
            if self.error is not None:
                raise RuntimeError(f"vLLM feeder stopped: {self.error!r}")
        return pending.results

    def _take(self, out) -> None:
        rid = out.request_id
        entry = self.waiting.pop(rid, None) or self.waiting.pop(rid.split("-")[0], None)
        if entry is not None:
            entry[0].set(entry[1], out)

    def _loop(self) -> None:
        try:
            while True:
                busy = self.llm_engine.has_unfinished_requests()
                items = []
                try:
                    items.append(self.inbox.get(block=not busy, timeout=None if busy else 1.0))
                    while True:
                        items.append(self.inbox.get_nowait())
                except queue.Empty:
                    pass
                for prompts, params, pending in items:
                    for i, prompt in enumerate(prompts):
                        rid = f"r{next(self.ids)}"
                        try:
                            self.llm_engine.add_request(rid, prompt, params)
                        except Exception as ex:  # noqa: BLE001 - this clip's error row (e.g. too long)
                            pending.set(i, ex)
                            continue
                        self.waiting[rid] = (pending, i)
                if self.llm_engine.has_unfinished_requests():
                    for out in self.llm_engine.step():
                        if out.finished:
                            self._take(out)
        except BaseException as ex:  # noqa: BLE001 - the engine is gone: fail every waiting call
            self.error = ex
            for pending, i in list(self.waiting.values()):
                pending.set(i, ex)
            self.waiting.clear()


class EngineStage:
    """Ray Data UDF (a callable class in an actor pool): one engine (`make_engine`: vLLM or HF) per
    actor for the job's lifetime. `events` names the job's event channel (job_events): the actor
    announces itself there once its engine is built, so the driver can print it."""

    def __init__(self, model_dir: str, engine: EngineConfig, sampling: SamplingConfig,
                 events: Optional[str] = None):
        from ark_ray.engines import make_engine

        t0 = time.time()
        with gpu_start_lock():
            t_lock = time.time()
            if engine.backend == "vllm" and 0 < engine.num_gpus < 1:   # k engines share each card
                import dataclasses

                from ark_ray.engines.vllm_engine import engine_memory_utilization
                engine = dataclasses.replace(engine, gpu_memory_utilization=engine_memory_utilization(engine))
            self.engine = make_engine(model_dir, engine)
        self.sampling = sampling
        self.feeder: Optional[VllmFeeder] = None   # started by the first vLLM call
        self.lock = threading.Lock()
        self.timing = {"created": t0, "waited_for_gpu_s": t_lock - t0, "build_s": time.time() - t_lock,
                       "ready": time.time(), "pid": os.getpid()}
        if events:
            job_events.publish(events, "engine", {"build_s": round(self.timing["build_s"], 2),
                                                  "waited_s": round(self.timing["waited_for_gpu_s"], 2)})

    # ---------------------------------------------------------------- one block

    def _vllm(self, waves: list[np.ndarray]) -> list:
        from ark_ray.engines.long_audio import join_chunks, split_long_audio
        from ark_ray.vllm_plugin import generation_prompt

        eng = self.engine
        with self.lock:
            if self.feeder is None:   # from here on only the feeder thread touches the engine
                self.feeder = VllmFeeder(eng)
        pieces, owners = split_long_audio(waves, eng.max_chunk_s)
        params = eng._params(self.sampling)
        if self.sampling.logprobs_topk <= 0:
            params.logprobs = None       # transcripts only: no per-step log-prob work in sampler or front end
        try:
            outs = self.feeder.generate([generation_prompt(eng.processor, p.samples) for p in pieces], params)
        except RuntimeError:
            outs = None
        if outs is None or self.feeder.error is not None:
            os._exit(1)   # the engine died under this call: Ray restarts the actor and retries the calls
        failed = {owners[j]: o for j, o in enumerate(outs) if isinstance(o, BaseException)}
        ok = [i for i in range(len(waves)) if i not in failed]
        keep = [j for j, o in enumerate(owners) if o not in failed]
        remap = {c: k for k, c in enumerate(ok)}
        results = [[{"token_ids": list(o.token_ids), "prompt_ids": list(outs[j].prompt_token_ids or [])}
                    for o in outs[j].outputs] for j in keep]
        ts = join_chunks([waves[i] for i in ok], [pieces[j] for j in keep], [remap[owners[j]] for j in keep],
                         results, max(1, self.sampling.n), eng.processor)
        n = max(1, self.sampling.n)
        out: list = [None] * len(waves)
        for k, i in enumerate(ok):
            out[i] = ts[k * n]
        for i, ex in failed.items():
            out[i] = ex
        return out

    def _sync(self, waves: list[np.ndarray]) -> list:
        """Synchronous engines (HF): one call at a time; a failing batch is retried clip by clip."""
        n = max(1, self.sampling.n)
        with self.lock:
            try:
                return self.engine.transcribe(waves, self.sampling)[::n]
            except Exception as batch_err:  # noqa: BLE001 - isolated per clip below
                if len(waves) == 1:
                    return [batch_err]
            out = []
            for w in waves:
                try:
                    out.append(self.engine.transcribe([w], self.sampling)[0])
                except Exception as ex:  # noqa: BLE001 - becomes this clip's error row
                    out.append(ex)
            return out

    def __call__(self, table: pa.Table) -> pa.Table:
        """A decoded block (decode_batch's table) -> the same rows with pred_text, pred_text_raw and
        segments (the chunker's windows, for clips it cut), minus `wave`."""
        n = table.num_rows
        err = table.column("error").to_pylist()
        detail = table.column("error_detail").to_pylist()
        silent = table.column("silent").to_pylist()
        ok = [i for i in range(n) if not err[i]]
        waves = waves_of(table)
        results = (self._vllm([waves[i] for i in ok]) if hasattr(self.engine, "llm")
                   else self._sync([waves[i] for i in ok])) if ok else []
        pred: list = [None] * n
        raw: list = [None] * n
        segments: list = [None] * n
        for i, r in zip(ok, results):
            if isinstance(r, BaseException):
                err[i] = r.reason if isinstance(r, AudioError) else "engine_error"
                detail[i] = r.message if isinstance(r, AudioError) else f"{type(r).__name__}: {r}"
                silent[i] = None
                continue
            pred[i], raw[i] = r.text, r.text_raw
            segments[i] = ([{"start_s": s.start_s, "end_s": s.end_s, "text": s.text} for s in r.segments]
                           if len(r.segments) > 1 else [])
        columns = {"pred_text": pa.array(pred, pa.string()), "pred_text_raw": pa.array(raw, pa.string()),
                   "segments": pa.array(segments, ADDED["segments"]), "silent": pa.array(silent, pa.bool_()),
                   "error": pa.array(err, pa.string()), "error_detail": pa.array(detail, pa.string())}
        return set_columns(table.drop_columns([WAVE]), columns)

    def close(self) -> None:
        """Stop the engine's processes cleanly."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to release
            pass
