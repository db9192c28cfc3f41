"""Typed job configs: dataclasses loaded from YAML, then `--key=value` CLI overrides.

Why one system: every job (opd, sft, transcribe, evaluate, serve) takes its settings the same
way, and every key carries its own documentation (`docs/config.md` is generated from the
`doc=` strings here, and a test fails when a key has none).

    cfg = parse_job_args(OpdConfig, sys.argv[1:], default_config="jobs/configs/opd_tiny.yaml")

Precedence: dataclass defaults < `--config FILE` (YAML) < `--a.b=value` overrides. Nested
sections use dotted keys (`--learner.zero_stage=3`). Unknown keys are errors, with a suggestion;
a removed or renamed key (a class's `removed_keys`) is an error that names its replacement.
Every class checks itself when built (`validate()`): rules that span keys fail at load time with
the key, why, and what to set instead, not later inside an actor.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import pathlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, TypeVar

import yaml

T = TypeVar("T")


class UserError(ValueError):
    """A problem with what the user asked for, not a bug: a bad key or value, a missing input, an
    output that cannot be written, a run folder that already holds a run. A job reports it as one
    line on stderr and exits with status 2 (`ark_ray.cli.run_job`); the other error classes of
    this kind (InputError, ManifestError, StorageError, ...) derive from it so a job needs no list."""


class ConfigError(UserError):
    """A config file or override that does not fit the typed schema."""


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# File extensions listed as audio when a job's input is a folder or an S3 prefix (the one list:
# ark_ray.data.listing and TranscribeConfig.extensions both use it).
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".oga", ".aif", ".aiff", ".au", ".caf",
                    ".w64", ".m4a", ".aac", ".wma", ".webm")


class Validated:
    """Base of every config class: `__post_init__` runs `validate()`, so a config is checked whenever
    it is built (by `load_config`, `dataclasses.replace` or a test). `validate` holds the rules
    that span keys; each error names the key, why, and what to set instead. Sections are built
    (and checked) before the job that holds them; `_build` prefixes a section's errors with its
    dotted path (`learner.zero_stage ...`)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        pass


def need(ok: bool, key: str, why: str) -> None:
    """A rule: when `ok` is false, raise `ConfigError("<key> <why>")`."""
    if not ok:
        raise ConfigError(f"{key} {why}")


def at_least(cfg: Any, low: float, *keys: str) -> None:
    for key in keys:
        v = getattr(cfg, key)
        need(v >= low, key, f"must be >= {low:g}, got {v}")


def opt(default: Any, doc: str, secret: bool = False, **kw: Any) -> Any:
    """A documented config field. Mutable defaults are copied per instance; a `secret` one is
    masked in what a job writes down (`to_dict(cfg, redact=True)`)."""
    meta = {"doc": doc, "secret": secret}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta, **kw)
    if dataclasses.is_dataclass(default):
        import copy
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


# --------------------------------------------------------------------------------------------
# Shared sections
# --------------------------------------------------------------------------------------------


@dataclass
class RayConfig(Validated):
    """Ray connection (every job's `ray` section)."""
    address: Optional[str] = opt(
        None, "Ray address to connect to. None: $RAY_ADDRESS if set (as under `ray job submit`), "
        "else start a local Ray.")
    num_cpus: Optional[int] = opt(
        None, "Logical CPUs for a local Ray (None: Ray's default). Ignored when connecting.")
    num_gpus: Optional[int] = opt(None, "GPUs for a local Ray (None: Ray's default).")
    namespace: str = opt("ark-ray", "Ray namespace for the job's named actors.")
    temp_dir: Optional[str] = opt(None, "Temp dir for a local Ray's session files.")

    def validate(self) -> None:
        for key in ("num_cpus", "num_gpus"):
            v = getattr(self, key)
            need(v is None or v >= 0, key, f"must be >= 0 or null (Ray's default), got {v}")
        need(bool(self.namespace), "namespace", "is empty: name a Ray namespace (default ark-ray)")


@dataclass
class InputConfig(Validated):
    """Training input through Ray Data (ark_ray/data/clip_stream.py): the manifest is read, and its
    audio decoded, cut and resampled, by Ray Data tasks on any node, streamed to the workers."""
    window_mb: float = opt(256.0, "Object-store memory (MiB) Ray Data may fill with decoded clips ahead of the "
                           "consumers; with the batches in flight, this bounds the input's object-store use "
                           "whatever the corpus size.")
    num_cpus: float = opt(0.5, "CPUs per Ray Data task of the input (reading, sorting, decoding): fractional, "
                          "so the input runs beside actors that hold most of a node's CPUs.")
    block_rows: int = opt(8, "Clips per decode task (and per decoded block).")

    def validate(self) -> None:
        need(self.window_mb > 0, "window_mb", f"must be > 0, got {self.window_mb}")
        need(self.num_cpus > 0, "num_cpus", f"must be > 0 (Ray Data tasks need a CPU share), got {self.num_cpus}")
        need(self.block_rows >= 1, "block_rows", f"must be >= 1, got {self.block_rows}")


@dataclass
class SamplingConfig(Validated):
    """Decoding settings for an inference engine."""
    temperature: float = opt(0.0, "Sampling temperature; 0 means greedy.")
    top_p: float = opt(1.0, "Nucleus sampling mass (1.0 disables).")
    n: int = opt(1, "Samples per clip.")
    max_new_tokens: int = opt(128, "Maximum transcript tokens per clip (per chunk for long audio).")
    logprobs_topk: int = opt(0, "If > 0, also return the top-k token ids and log-probs at every position. OPD "
                             "sets it from its own `topk` (leave it at 0 there; another value is refused).")
    seed: Optional[int] = opt(None, "Sampling seed (None: nondeterministic when temperature > 0).")

    def validate(self) -> None:
        need(self.temperature >= 0, "temperature", f"must be >= 0 (0: greedy), got {self.temperature}")
        need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1] (1.0 disables nucleus sampling), got {self.top_p}")
        at_least(self, 1, "n", "max_new_tokens")
        at_least(self, 0, "logprobs_topk")


ENGINE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_resources(resources: dict, key: str = "resources") -> None:
    """Custom Ray resources: names to positive amounts; CPUs, GPUs and memory have their own keys."""
    for name, amount in resources.items():
        need(name not in ("CPU", "GPU", "memory", "object_store_memory"), key,
             f"names {name}, which has its own key (num_cpus, num_gpus); list only custom resources")
        need(isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount > 0, key,
             f"{name}={amount!r}: an amount must be a number > 0")


@dataclass
class EngineConfig(Validated):
    """One inference engine actor (vLLM or HF) and its resources."""
    backend: Literal["vllm", "hf"] = opt("vllm", "Inference engine: vLLM (default) or HF transformers.")
    dtype: str = opt("auto", "Model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")
    device: str = opt("auto", "HF engine device: auto, cpu, cuda.")
    max_num_seqs: int = opt(64, "Most sequences vLLM decodes at once.")
    max_model_len: int = opt(1024, "Longest prompt + transcript in tokens (30 s of audio = 384 prompt tokens).")
    gpu_memory_utilization: float = opt(0.85, "Fraction of GPU memory vLLM may take.")
    cpu_kv_cache_max_gb: float = opt(4.0, "CPU vLLM engines: cap (GiB; 0: none) on the KV cache each sizes for "
                                     "max_num_seqs x max_model_len tokens (engines/cpu_memory.py; at least one "
                                     "full sequence); its Ray actor asks for model bytes + that cache as `memory`. "
                                     "VLLM_CPU_KVCACHE_SPACE (GiB), when set, overrides it.")
    enforce_eager: bool = opt(False, "Disable CUDA graphs in vLLM (always eager on CPU).")
    # -- vLLM throughput knobs (bench/engine_sweep.py measures them; ark_ray/vllm_plugin/engine_args.py applies them)
    max_num_batched_tokens: int = opt(
        0, "Tokens vLLM schedules per step (prefill + decode). It also sizes the encoder budget and the encoder "
        "cache, so it bounds the clips encoded per step (~this / 375 for 30 s clips). 0: vLLM's default (16384 "
        "for offline use on an 80 GB+ card). With chunked prefill off it must be >= max_model_len.")
    enable_chunked_prefill: bool = opt(True, "Let vLLM split long prefills across steps (its default).")
    encoder_attention: Literal["auto", "flash", "sdpa", "padded"] = opt(
        "auto", "How the audio encoder runs inside vLLM. auto: packed clips (no work on padding) with "
        "flash-attention varlen on CUDA in bf16/fp16, else SDPA; flash / sdpa: force one; padded: the HF "
        "encoder's padded batch (the old path, for A/B runs).")
    encoder_compile: bool = opt(
        False, "torch.compile the encoder's per-layer elementwise work (LayerNorm, RoPE, GELU, residuals) around "
        "the matmuls, on CUDA only; falls back to eager if compiling fails. Off by default: on the H200 it gave no "
        "gain over packed flash-attention (5236 vs 5363 audio-s/s) and added ~80 s to engine start-up.")
    compilation_config: dict = opt(
        {}, "Passed to vLLM's `compilation_config` as is (GPU only; empty: vLLM's default, torch.compile plus "
        "piecewise CUDA graphs). E.g. {mode: 0, cudagraph_mode: FULL_DECODE_ONLY} skips torch.compile and keeps "
        "CUDA graphs for decode steps: a faster start-up (bench/engine_startup.py measures each setting).")
    max_chunk_s: float = opt(30.0, "Long audio is cut by the shared chunker into windows of at most this many seconds.")
    num_gpus: float = opt(0.0, "GPUs per engine actor (0 on CPU).")
    num_cpus: float = opt(1.0, "CPUs per engine actor.")
    cache_dir: Optional[str] = opt(
        "~/.cache/ark-ray/engine", "Where vLLM engines keep what they compile, on each node (VLLM_CACHE_ROOT, "
        "TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR, FLASHINFER_WORKSPACE_BASE and CUDA_CACHE_PATH under it; a "
        "variable already set wins): an engine started on a node that has run one before reuses it. None: the "
        "libraries' own defaults.")
    resources: dict = opt({}, "Custom Ray resources each engine actor asks for besides CPUs and GPUs, e.g. "
                          "{ark_engine: 1}: it then runs only on nodes that advertise them (the node types of "
                          "cluster/*.yaml do, one role per node type). {}: none.")

    def validate(self) -> None:
        check_resources(self.resources)
        need(self.dtype in ENGINE_DTYPES, "dtype", f"{self.dtype!r} is not one of {list(ENGINE_DTYPES)}")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
             f"{self.device!r} is not auto, cpu, cuda or cuda:N")
        at_least(self, 1, "max_num_seqs", "max_model_len")
        at_least(self, 0, "max_num_batched_tokens", "num_gpus", "num_cpus", "cpu_kv_cache_max_gb")
        need(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization",
             f"is a fraction of the card: in (0, 1], got {self.gpu_memory_utilization}")
        need(self.max_chunk_s > 0, "max_chunk_s", f"must be > 0, got {self.max_chunk_s}")
        need(self.enable_chunked_prefill or self.max_num_batched_tokens == 0
             or self.max_num_batched_tokens >= self.max_model_len, "max_num_batched_tokens",
             f"={self.max_num_batched_tokens} < max_model_len={self.max_model_len} with enable_chunked_prefill "
             "off: a whole prompt must fit one step; raise it, set it to 0 (vLLM's default) or turn chunked "
             "prefill on")

    def check_installed(self) -> None:
        """Fail in the driver with a clear message instead of in every engine actor."""
        import importlib.util
        if self.backend == "vllm" and (importlib.util.find_spec("vllm") is None
                                       or importlib.util.find_spec("ark_ray.engines.vllm_engine") is None):
            raise ConfigError("engine.backend=vllm but vLLM (or ark_ray.engines.vllm_engine) is not installed; "
                              "install the gpu/cpu extra or pass --engine.backend=hf")


@dataclass
class LearnerConfig(Validated):
    """The DeepSpeed learner group (SFT and OPD)."""
    num_workers: int = opt(1, "Learner ranks (Ray actors, one torch.distributed rank each).")
    use_gpu: bool = opt(False, "One GPU per rank, NCCL, bf16 compute with fp32 master weights, fp32 optimizer "
                        "state and (ZeRO 1-3) fp32 gradient accumulation; else CPU, gloo, fp32.")
    zero_stage: int = opt(2, "DeepSpeed ZeRO stage (0-3).")
    lr: float = opt(3e-4, "Peak learning rate (AdamW).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    betas: list = opt([0.9, 0.98], "AdamW betas (beta1, beta2): the decay rates of the gradient's running mean "
                      "and of its running square.")
    warmup_steps: int = opt(0, "Linear warm-up steps before the cosine decay.")
    min_lr_ratio: float = opt(0.1, "Cosine decay floor as a fraction of lr.")
    micro_batch_size: int = opt(
        8, "Most rows one rank runs forward/backward on at once (0: its whole shard). Each batch handed to the "
        "learner is split over the ranks (rows r, r + world, ...), and each rank's shard into the fewest "
        "micro-batches of at most this many rows (every rank runs the same number); their gradients add up. The "
        "loss is normalised by the whole batch's token count, so the update does not depend on this setting, "
        "only peak memory and speed do.")
    grad_accum_steps: int = opt(
        1, "Batches per optimizer step: the gradients of this many consecutive learner steps (batches, each "
        "micro-batched as above) add up, then one optimizer and learning-rate step follows. Each batch's loss is "
        "normalised by its own token count and divided by grad_accum_steps (batches weigh equally; with equal "
        "token counts this is exactly one step on their union). The LR schedule and warmup_steps count "
        "optimizer steps; checkpoints should fall on optimizer steps (accumulated gradients are not saved).")
    gradient_checkpointing: bool = opt(
        False, "Activation checkpointing: every Qwen2 decoder layer and every Whisper encoder layer keeps only its "
        "input and recomputes the rest in the backward pass (transformers' gradient_checkpointing_enable, "
        "non-reentrant). Less activation memory for about one more forward pass of compute; the conv stem, "
        "adapter and lm_head are not checkpointed.")
    grad_clip: float = opt(1.0, "Gradient norm clip (0 disables).")
    seed: int = opt(0, "Seed for parameter init (random preset models) and dropout. The data order has its "
                    "own key: the job's top-level `seed`.")
    weight_sync: Literal["auto", "ipc", "broadcast", "object_store"] = opt(
        "auto", "How new weights reach the rollout engines (always in the engine's dtype, in buckets). ipc: the "
        "engine shares learner rank 0's GPU; it copies from the learner's GPU buckets through CUDA IPC handles. "
        "broadcast: learner rank 0 broadcasts into the vLLM worker processes over a standalone process group "
        "(NCCL between different GPUs, also across nodes; gloo on CPU). object_store: one Ray object per bucket, "
        "streamed into the engine by its actor (no GPU, or no NCCL path). auto: per engine, ipc on a shared GPU, "
        "broadcast on different GPUs, object_store without GPUs.")
    weight_sync_bucket_mb: float = opt(
        1024.0, "Weight-sync bucket size in MiB: no message, object or broadcast holds more (a layer is never "
        "split; one larger layer gets its own bucket).")
    weight_sync_retries: int = opt(
        1, "Retries of a weight sync that failed on a rollout actor or the learner; past them the run stops with "
        "that actor's error.")
    weight_sync_timeout_s: float = opt(
        900.0, "broadcast: longest wait for every rollout worker to reach a sync (after its current rollout, or "
        "its restart); past it the run fails.")
    weight_sync_collective_timeout_s: float = opt(
        300.0, "broadcast: longest a group formation or one bucket's broadcast may take; past it (a rollout "
        "worker died mid-sync) the sync fails and is retried with a new group.")
    num_cpus: float = opt(1.0, "CPUs each learner rank (actor) asks for.")
    num_gpus: float = opt(1.0, "GPU share each rank asks for when use_gpu (a fraction lets the learner share one "
                          "card with the rollout engine and teacher, as in the single-GPU OPD benchmark; ranks must "
                          "still sit on different cards). Every role names its GPU share `num_gpus` in its own "
                          "section: learner.num_gpus, rollout_engine.num_gpus, teacher_engine.num_gpus.")

    resources: dict = opt({}, "Custom Ray resources each rank's placement bundle asks for besides CPUs and GPUs, "
                          "e.g. {ark_learner: 1}: the group then runs only on nodes that advertise them (cluster/*.yaml's "
                          "8-GPU node type does). {}: none.")

    removed_keys = {"num_gpus_per_worker": "renamed to learner.num_gpus (every role's GPU share is `num_gpus` in "
                                           "its section: learner.num_gpus, rollout_engine.num_gpus, "
                                           "teacher_engine.num_gpus)",
                    "num_cpus_per_worker": "renamed to learner.num_cpus (as rollout_engine.num_cpus, "
                                           "teacher_engine.num_cpus)"}

    def validate(self) -> None:
        if self.micro_batch_size < 0:
            raise ConfigError(f"micro_batch_size must be >= 0 (0: no split), got {self.micro_batch_size}")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage must be one of DeepSpeed's stages 0-3, got {self.zero_stage}")
        if self.weight_sync_bucket_mb <= 0:
            raise ConfigError(f"weight_sync_bucket_mb must be > 0, got {self.weight_sync_bucket_mb}")
        if self.weight_sync_retries < 0:
            raise ConfigError(f"weight_sync_retries must be >= 0, got {self.weight_sync_retries}")
        at_least(self, 1, "num_workers")
        at_least(self, 0, "warmup_steps", "weight_decay", "grad_clip", "num_cpus")
        need(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"is a fraction of lr: in [0, 1], got {self.min_lr_ratio}")
        need(len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas),
             "betas", f"must be two numbers in [0, 1) (AdamW's beta1, beta2), got {self.betas}")
        for key in ("weight_sync_timeout_s", "weight_sync_collective_timeout_s"):
            need(getattr(self, key) > 0, key, f"must be > 0 seconds, got {getattr(self, key)}")
        if self.use_gpu:
            need(0 < self.num_gpus <= 1, "num_gpus",
                 f"must be in (0, 1] with use_gpu (one rank per card, a fraction to share it), "
                 f"got {self.num_gpus}")
        check_resources(self.resources)
        need(self.weight_sync != "ipc" or self.use_gpu, "weight_sync",
             "=ipc shares CUDA memory and needs use_gpu=true; on CPU set weight_sync=auto (object_store)")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {getattr(tp, '__name__', tp)})")
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}"
                              + _section_hint(tp, value, key))
        return _build(tp, value, prefix=key + ".")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError as e:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from e
        if f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from e
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if (tp is list or origin is list) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value]  # `--predictions x.jsonl`: one item
    if tp in (list, dict) or origin in (list, dict):
        want = origin or tp
        if not isinstance(value, want):
            raise ConfigError(f"{key}: expected a {want.__name__}, got {value!r}")
        return value
    return value


def _over_section_default(f: dataclasses.Field, value: Any) -> Any:
    """A section's given keys on top of the section's own default in its job, not of the section
    class's defaults (`--teacher_engine.num_gpus=1` keeps OPD's teacher_engine.backend=hf)."""
    if not isinstance(value, dict) or f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
        return value
    default = f.default_factory()  # type: ignore[misc]
    if not dataclasses.is_dataclass(default):
        return value
    base = {k.name: getattr(default, k.name) for k in dataclasses.fields(default)}
    base = {k: (to_dict(v) if dataclasses.is_dataclass(v) else v) for k, v in base.items()}
    return _deep_merge(base, value)


def _section_hint(cls: type, value: Any, key: str) -> str:
    """For a scalar given where a section goes (a key that became a section, like `teacher_engine`):
    the section's key that takes this value as one of its choices, if any."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if typing.get_origin(hints[f.name]) is Literal and value in typing.get_args(hints[f.name]):
            return f" (did you mean {key}.{f.name}={value}?)"
    return ""


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k in getattr(cls, "removed_keys", {}):
            raise ConfigError(f"{prefix}{k} was removed: {cls.removed_keys[k]}")
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, names, n=1)
        hint = f"did you mean {prefix}{close[0]}?" if close else "every key: --help, or docs/config.md"
        raise ConfigError(f"unknown config key {prefix}{k} ({hint})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {k: _coerce(_over_section_default(fields[k], v), hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from e
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None


def to_dict(cfg: Any, redact: bool = False) -> dict:
    """The config as plain data (for YAML dumps, logs and checkpoints); `redact`: secrets (keys
    declared `secret`, e.g. s3.secret_access_key) masked, for files others may read (summary.json)."""
    out = dataclasses.asdict(cfg)
    if redact:
        _redact(cfg, out)
    return out


def _redact(cfg: Any, out: dict) -> None:
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.metadata.get("secret") and v:
            out[f.name] = "<redacted>"
        elif dataclasses.is_dataclass(v):
            _redact(v, out[f.name])


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """`["--a.b=1", "--c", "x", "--d", "y", "z"]` -> `{"a": {"b": 1}, "c": "x", "d": ["y", "z"]}` (values
    parsed as YAML scalars; `--key-name` is `--key_name`; a bare `--flag` is true)."""
    out: dict = {}
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --key=value")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        elif i + 1 < len(overrides) and not overrides[i + 1].startswith("--"):
            key, raw = body, overrides[i + 1]
            i += 1
        else:
            key, raw = body, "true"  # a bare flag: --resume
        key = key.replace("-", "_")
        value = yaml.safe_load(raw) if raw != "" else ""
        more = []
        while "=" not in body and i + 1 < len(overrides) and not overrides[i + 1].startswith("--"):
            more.append(overrides[i + 1])  # `--predictions a b c`: several values make a list
            i += 1
        if more:
            value = [value] + [yaml.safe_load(m) if m != "" else "" for m in more]
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key} conflicts with an earlier value")
        node[parts[-1]] = value
        i += 1
    return out


def load_config(cls: type[T], path: str | os.PathLike | None = None,
                overrides: list[str] | dict | None = None) -> T:
    """Defaults < YAML file at `path` < overrides (CLI strings or a nested dict). Building each
    section and the job runs its `validate()` (Validated), so what this returns passed every rule."""
    data: dict = {}
    if path is not None:
        p = pathlib.Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        data = loaded
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        data = _deep_merge(data, extra)
    return _build(cls, data)


def parse_job_args(cls: type[T], argv: list[str], default_config: str | os.PathLike | None = None) -> T:
    """A job's command line: `[--config FILE] [--key=value ...]`; no --config -> `default_config`."""
    argv = list(argv)
    path = default_config
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            path, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            path, i = a.split("=", 1)[1], i + 1
            continue
        if a in ("-h", "--help"):
            print(render_help(cls))
            raise SystemExit(0)
        rest.append(a)
        i += 1
    return load_config(cls, path, rest)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Documentation
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    tp, optional = _unwrap_optional(tp)
    if typing.get_origin(tp) is Literal:
        name = " | ".join(repr(a) for a in typing.get_args(tp))
    else:
        name = getattr(tp, "__name__", str(tp).replace("typing.", ""))
    return f"{name} (optional)" if optional else name


def iter_keys(cls: type, prefix: str = ""):
    """Yield (dotted key, type name, default, doc) for every leaf key of a config class."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner, _ = _unwrap_optional(tp)
        doc = f.metadata.get("doc", "")
        if dataclasses.is_dataclass(inner):
            yield (prefix + f.name, inner.__name__, "(section)", doc)
            yield from iter_keys(inner, prefix + f.name + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        yield (prefix + f.name, _type_name(tp), default, doc)


def render_help(cls: type, prog: Optional[str] = None) -> str:
    """A job's `--help`: the usage line, what the job does, then every key with its type, default
    and meaning (the same text as docs/config.md), wrapped for a terminal."""
    import shutil
    import sys
    import textwrap

    prog = prog or f"python {os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else 'JOB'}"
    width = min(shutil.get_terminal_size((100, 24)).columns, 110)
    out = [f"usage: {prog} [--config FILE.yaml] [--key=value ...] [--debug]", "",
           (cls.__doc__ or "").strip().splitlines()[0], "",
           "--debug shows the traceback of a bad-usage error (otherwise one line and exit status 2).", "",
           "keys:"]
    for key, tname, default, doc in iter_keys(cls):
        if default == "(section)":
            out += ["", f"  [{key}] {doc}"]
            continue
        out.append(f"  --{key}  ({tname}, default {default!r})")
        out += textwrap.wrap(doc, width=width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(out)


def render_markdown(classes: list[type]) -> str:
    lines = ["# Configuration keys", "",
             "Generated from `ark_ray/config.py` by `python -m ark_ray.config > docs/config.md`. "
             "Jobs take `--config FILE.yaml` and `--key=value` overrides (dotted keys for sections). Every "
             "config is checked when loaded (`validate()` of each class: rules that span keys, with the key, why, "
             "and what to set instead). One name per idea across jobs: `model` (the model a job runs or starts "
             "from; OPD names its two by role, `student` and `teacher`), `steps`, `eval_manifest`, `seed` (the "
             "data order; `learner.seed`: parameter init and dropout). Renamed keys fail with the new name.", ""]
    for cls in classes:
        lines += [f"## {cls.__name__}", "", (cls.__doc__ or "").strip().splitlines()[0], "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, tname, default, doc in iter_keys(cls):
            d = "" if default == "(section)" else f"`{default!r}`"
            lines.append(f"| `{key}` | {tname} | {d} | {doc} |")
        lines.append("")
        for old, why in getattr(cls, "removed_keys", {}).items():
            lines.append(f"- `{old}` (removed; loading it is an error): {why}")
        if getattr(cls, "removed_keys", None):
            lines.append("")
    return "\n".join(lines)


def job_config_classes() -> list[type]:
    """Every top-level job config, for docs and the documentation test."""
    return list(_JOB_CONFIGS)


def documented_classes() -> list[type]:
    """Every class docs/config.md documents: the shared sections, then the job configs."""
    return [RayConfig, SamplingConfig, EngineConfig, LearnerConfig, CanaryConfig] + job_config_classes()


_JOB_CONFIGS: list[type] = []


def job_config(cls: type[T]) -> type[T]:
    """Register a top-level job config class (so it appears in docs/config.md)."""
    _JOB_CONFIGS.append(cls)
    return cls


# --------------------------------------------------------------------------------------------
# Job configs (one per job; each job's owner keeps its section here so all keys live in one place)
# --------------------------------------------------------------------------------------------

# >>> job configs >>>


@dataclass
class CanaryConfig(Validated):
    """ArkIngress's `user_config`: a share of transcription requests goes to a candidate model.

    jobs/promote.py sets it in the deployed Serve config (`deployments: [{name: ArkIngress,
    user_config: {...}}]`); Serve hands it to the running ingress replicas without restarting them.
    The candidate runs as its own Serve application (`ark_ray.serve.app:build_model_app`, no route).
    """
    app: Optional[str] = opt(None, "Serve application whose ArkTranscriber serves the candidate (None: no canary).")
    version: str = opt("", "The candidate's version label (shown in /v1/models, the response header and the metrics).")
    fraction: float = opt(0.0, "Share of transcription requests sent to the candidate, in [0, 1].")

    def validate(self) -> None:
        need(0.0 <= self.fraction <= 1.0, "fraction", f"must be in [0, 1], got {self.fraction}")
        need(self.fraction == 0.0 or bool(self.app), "app", "is empty: name the candidate's Serve application "
             "or set fraction to 0")


@job_config
@dataclass
class ServeConfig(Validated):
    """ark_ray.serve (`serve run serve_configs/*.yaml`): the OpenAI-compatible transcription endpoint."""
    model: str = opt("assets/models/student", "HF-format ARK-ASR directory the replicas load; `$VAR`/`${VAR}` "
                     "are expanded from the environment of `serve run`, relative paths from its directory.")
    model_name: str = opt("ark-asr", "Model id clients pass as `model` and GET /v1/models lists.")
    model_version: Optional[str] = opt(None, "Version label of the model, shown in GET /v1/models, the "
                                       "X-Ark-Model-Version response header and the per-version metrics. None: the "
                                       "model directory's name and a fingerprint of its files (jobs/promote.py sets it).")
    engine: EngineConfig = opt(EngineConfig(), "Inference engine of each model replica (num_gpus/num_cpus: per replica).")
    max_new_tokens: int = opt(128, "Most transcript tokens per 30 s window.")
    max_batch_size: int = opt(16, "HF engine only: most audio windows one replica decodes together (@serve.batch). "
                              "vLLM replicas batch continuously, up to engine.max_num_seqs.")
    batch_wait_timeout_s: float = opt(0.01, "HF engine only: how long a replica waits to fill a batch before running it.")
    max_ongoing_requests: int = opt(32, "Windows a model replica holds at once (>= max_batch_size; with vLLM, "
                                    "~2x engine.max_num_seqs keeps the engine fed); beyond it they queue.")
    max_queued_requests: int = opt(64, "Windows waiting for a model replica; beyond it requests get 503 (-1: unbounded).")
    max_upload_mb: float = opt(25.0, "Largest accepted upload in MB (bigger: 413).")
    max_audio_s: float = opt(600.0, "Longest accepted audio in seconds (longer: 400 too_long).")
    api_key: Optional[str] = opt(None, "If set, requests to /v1/* need `Authorization: Bearer <key>` (else 401).")
    api_key_env: Optional[str] = opt("ARK_SERVE_API_KEY", "Environment variable read for the API key when api_key is unset.")
    ingress_max_ongoing_requests: int = opt(1000, "Concurrent HTTP requests one ingress replica accepts "
                                            "(high: it only decodes audio and waits, so /health stays responsive).")
    window_retries: int = opt(2, "Times the ingress resubmits an audio window whose model replica was lost (node "
                              "gone, actor died) to another replica; a window is idempotent, so the client sees no "
                              "error. After the last: 503 replica_lost with Retry-After.")

    removed_keys = {"model_dir": "renamed to model (every job names the model it runs `model`)"}

    def validate(self) -> None:
        at_least(self, 1, "max_batch_size", "max_new_tokens", "max_ongoing_requests", "ingress_max_ongoing_requests")
        at_least(self, 0, "batch_wait_timeout_s")
        at_least(self, -1, "max_queued_requests")
        at_least(self, 0, "window_retries")
        need(self.model_version is None or bool(self.model_version.strip()), "model_version",
             "is empty: set a label or leave it null (the directory's fingerprint)")
        need(self.max_ongoing_requests >= self.max_batch_size, "max_ongoing_requests",
             f"({self.max_ongoing_requests}) must be >= max_batch_size ({self.max_batch_size}), or batches can "
             "never fill")
        for key in ("max_upload_mb", "max_audio_s"):
            need(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        windows = max_windows(self.max_audio_s, self.engine.max_chunk_s)
        # All windows of a request are submitted at once and wait in the handle's queue until a
        # replica takes them, so a smaller queue would turn away one long clip on an idle server.
        need(not 0 <= self.max_queued_requests < windows, "max_queued_requests",
             f"({self.max_queued_requests}) must be >= {windows}, the most windows one {self.max_audio_s:g} s "
             "upload can have (or -1 for unbounded)")
        need(self.api_key is None or self.api_key != "", "api_key", "is empty: set a key or leave it null")


def max_windows(max_audio_s: float, max_chunk_s: float) -> int:
    """Upper bound on windows per clip: the chunker never cuts a window shorter than half its max."""
    return max(1, math.ceil(max_audio_s / (max_chunk_s / 2)))


@dataclass
class S3Config(Validated):
    """S3 access (used by jobs that read or write s3:// URIs)."""
    endpoint_url: Optional[str] = opt(None, "S3 endpoint (e.g. http://127.0.0.1:9000 for MinIO/moto). "
                                      "None: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL, else AWS.")
    region: Optional[str] = opt(None, "Region. None: $AWS_REGION / $AWS_DEFAULT_REGION.")
    access_key_id: Optional[str] = opt(None, "Access key. None: $AWS_ACCESS_KEY_ID, else the standard AWS "
                                       "credential chain (config files, instance role).")
    secret_access_key: Optional[str] = opt(None, "Secret key. None: $AWS_SECRET_ACCESS_KEY.", secret=True)
    session_token: Optional[str] = opt(None, "Session token for temporary credentials. None: $AWS_SESSION_TOKEN.",
                                       secret=True)
    anonymous: bool = opt(False, "Unsigned requests (public buckets).")

    def validate(self) -> None:
        need(not (self.anonymous and (self.access_key_id or self.secret_access_key or self.session_token)),
             "anonymous", "=true sends unsigned requests, so the given keys would be ignored: drop the keys "
             "or set anonymous=false")


@job_config
@dataclass
class SftConfig(Validated):
    """jobs/sft.py: supervised fine-tuning on a JSONL/Parquet manifest (also teacher-data adaptation)."""
    model: str = opt("preset:tiny", "Model to start from: an HF-format ARK-ASR directory, or `preset:NAME` for a "
                     "random model of a preset with a tokenizer trained on the demo corpus.")
    model_overrides: dict = opt({}, "ArkAsrConfig overrides when model is a preset (e.g. num_hidden_layers).")
    train_manifest: str = opt("assets/demo_corpus/train_sample.jsonl", "Training manifest (JSONL or Parquet).")
    eval_manifest: Optional[str] = opt("assets/demo_corpus/dev.jsonl", "Held-out manifest for periodic WER "
                                       "(None: no eval).")
    text_field: str = opt("text", "Manifest column holding the target text (`pred_text` for teacher labels).")
    output_dir: str = opt("runs/sft", "The run folder: a local path, s3://bucket/prefix or any URI pyarrow knows. "
                          "Checkpoints (checkpoints/step_N, every rank's DeepSpeed shards, through Ray Train's storage), "
                          "metrics.jsonl, summary.json, the final HF export (final/) and job.log go there.")
    steps: int = opt(20, "Learner steps (optimizer steps when learner.grad_accum_steps is 1).")
    batch_size: int = opt(8, "Utterances per optimizer step (split over learner ranks).")
    eval_every: int = opt(0, "Steps between eval_manifest WER evaluations (0: only at the end).")
    eval_max_samples: int = opt(64, "Most eval_manifest utterances scored per evaluation.")
    save_every: int = opt(0, "Steps between checkpoints (0: only at the end).")
    resume: bool = opt(False, "Continue from the last checkpoint in output_dir, also on another cluster (same data "
                       "order, no row repeated or skipped). Without it (or overwrite), an output_dir that holds a "
                       "run is refused.")
    overwrite: bool = opt(False, "Delete the run already in output_dir (checkpoints, metrics, summary, exports, "
                          "init model, job.log; nothing else) and start a new one.")
    max_failures: int = opt(3, "Learner-group restarts after a rank fails or is lost with its node (Ray Train's "
                            "FailureConfig.max_failures): the group starts again where there is room and loads the last "
                            "checkpoint (save_every), and the steps since are trained again on the same rows. Past it the "
                            "job stops with one error line that says how to --resume. 0: never restart; -1: no limit.")
    recovery_timeout_s: float = opt(600.0, "Longest wait for room for the learner group each time it starts or "
                                    "restarts (e.g. for the autoscaler's replacement node); a start that cannot "
                                    "place its ranks in time fails and counts like a failure.")
    keep_checkpoints: int = opt(2, "Checkpoints kept in output_dir/checkpoints (older ones are deleted once a newer "
                                "one is complete).")
    local_dir: Optional[str] = opt(None, "For a remote output_dir: the driver's local folder for the live job.log and "
                                   "the metrics buffer. None: <tmp>/ark-ray-runs/<scheme>/<bucket>/<prefix>. Must stay "
                                   "unset for a local output_dir.")
    max_audio_s: float = opt(30.0, "Clips longer than this are error rows.")
    featurize_workers: int = opt(1, "Ray Data actors decoding audio and computing log-mel for the learner "
                                 "(1 leaves a small CPU to the learner; raise it on a GPU machine).")
    max_new_tokens: int = opt(48, "Generation limit for the eval WER.")
    export_dtype: Literal["bfloat16", "float16", "float32"] = opt("bfloat16", "dtype of the final HF export.")
    export_every_save: bool = opt(False, "Also write an HF snapshot (snapshots/step_N) at every checkpoint.")
    skip_bad_rows: bool = opt(False, "Unusable manifest lines (bad JSON, no audio, impossible segments) stop the job "
                              "at load time with every bad line listed; true: skip them and log how many.")
    seed: int = opt(0, "Seed of the data order (the permutation of train_manifest, one per epoch); "
                    "learner.seed seeds parameter init and dropout.")
    learner: LearnerConfig = opt(LearnerConfig(), "Learner ranks (Ray Train workers, DeepSpeed): num_workers, "
                                 "num_gpus/num_cpus per rank, ZeRO stage, optimizer.")
    s3: S3Config = opt(S3Config(), "S3 endpoint and credentials for s3:// manifests and output_dir (default: the "
                       "standard AWS environment variables).")
    ray: RayConfig = opt(RayConfig(), "Ray connection.")

    removed_keys = {"init_model": "renamed to model (every job names the model it starts from `model`)",
                    "dev_manifest": "renamed to eval_manifest (as in jobs/opd.py)",
                    "max_steps": "renamed to steps (as in jobs/opd.py)"}

    def validate(self) -> None:
        at_least(self, 1, "steps", "batch_size", "featurize_workers", "max_new_tokens")
        at_least(self, 0, "eval_every", "eval_max_samples", "save_every")
        at_least(self, -1, "max_failures")
        at_least(self, 1, "keep_checkpoints")
        need(self.recovery_timeout_s > 0, "recovery_timeout_s", f"must be > 0 seconds, got {self.recovery_timeout_s}")
        need(self.max_audio_s > 0, "max_audio_s", f"must be > 0, got {self.max_audio_s}")
        need(bool(self.text_field), "text_field", "is empty: name the manifest column with the target text")
        need(not self.model_overrides or self.model.startswith("preset:"), "model_overrides",
             f"only apply to a `preset:NAME` model, not the checkpoint {self.model}; leave them empty")
        need(self.batch_size >= self.learner.num_workers, "batch_size",
             f"({self.batch_size}) must be >= learner.num_workers ({self.learner.num_workers}): every rank "
             "takes at least one row of each batch")
        gas = self.learner.grad_accum_steps
        need(gas == 1 or (self.steps % gas == 0 and self.save_every % gas == 0), "learner.grad_accum_steps",
             f"={gas} must divide steps ({self.steps}) and save_every ({self.save_every}): checkpoints hold no "
             "accumulated gradients")
        need(self.learner.weight_sync == "auto", "learner.weight_sync",
             f"={self.learner.weight_sync} does nothing in SFT (no rollout engines); leave it at auto")

@job_config
@dataclass
class OpdConfig(Validated):
    """jobs/opd.py: asynchronous on-policy distillation (vLLM rollouts, teacher scorers, DeepSpeed learners)."""
    student: str = opt("assets/models/student", "Student model directory (HF format); the learner trains it.")
    teacher: str = opt("assets/models/teacher", "Teacher model directory: an ARK-ASR checkpoint (teacher_backend "
                       "ark) or a Qwen3-ASR one in transformers' layout, like Qwen/Qwen3-ASR-1.7B-hf (qwen3_asr).")
    teacher_backend: Literal["ark", "qwen3_asr"] = opt(
        "ark", "ark: an ARK-architecture teacher with the student's text vocabulary (refused otherwise). qwen3_asr: "
        "the Qwen3-ASR teacher of open-audio-opd's OPD training script; it reads that script's prompt (chat "
        "template, audio, `language X<asr_text>`) "
        "then the student's own tokens through an explicit token-string map; response positions whose token has "
        "no teacher token are left out of the loss and counted (unmapped_positions).")
    teacher_language: Optional[str] = opt(
        None, "qwen3_asr: the prompt language (code or name) for clips whose manifest row has no `language`; "
        "None: guessed from the student's transcript by script, Latin text as English.")
    teacher_logprobs_k: int = opt(
        0, "qwen3_asr on vllm: teacher log-probs read per position (vLLM's prompt_logprobs); student top-k ids "
        "outside them and the forced token fall into the tail bucket on both sides. 0: 2 x topk.")
    train_manifest: str = opt("assets/demo_corpus/train_sample.jsonl", "Audio to distil on (transcripts not needed); "
                              "`demo://unlabelled[-N]`: N demo utterances without transcripts, made on first use.")
    eval_manifest: Optional[str] = opt("assets/demo_corpus/test.jsonl", "Held-out manifest for student/teacher WER; "
                                       "`demo://heldout[-N]`: the demo's N test-split utterances, made on first use.")
    output_dir: str = opt("runs/opd", "The run folder: checkpoints (every learner rank's shards), metrics.jsonl, "
                          "summary.json, curves.png, the final HF export, job.log's copy. A local path (on a cluster: a "
                          "mount every node shares), s3://bucket/prefix (settings in `s3`) or any URI pyarrow opens "
                          "(gs://, abfs://, hdfs://).")
    local_dir: Optional[str] = opt(None, "For a remote output_dir: the driver's local folder for the live job.log, the "
                                   "metrics buffer and the HF export before upload. None: "
                                   "<tmp>/ark-ray-runs/<scheme>/<bucket>/<prefix>. Must stay unset for a local output_dir.")
    keep_checkpoints: int = opt(2, "Complete checkpoints kept in output_dir/checkpoints (older ones are deleted once "
                                "a newer one is committed).")
    mode: Literal["async", "sync"] = opt("async", "async overlaps rollout, teacher and learner; sync runs them in turn.")
    steps: int = opt(12, "Learner steps.")
    rollout_batch_size: int = opt(8, "Clips per rollout batch (= samples per learner step when n=1).")
    num_rollout_workers: int = opt(1, "RolloutWorker actors (student on the inference engine).")
    num_teacher_workers: int = opt(1, "TeacherScorer actors.")
    topk: int = opt(16, "k of the teacher and student top-k whose union carries the loss.")
    tau: float = opt(1.0, "Distillation temperature (loss scaled by tau^2).")
    sync_every: int = opt(1, "Learner steps between weight pushes to the rollout workers.")
    max_staleness: int = opt(1, "Trajectories more than this many versions behind are dropped (and counted).")
    max_inflight: int = opt(3, "Most batches between rollout start and learner (bounded queues).")
    eval_every: int = opt(0, "Steps between student WER evaluations (0: before and after only).")
    eval_max_samples: int = opt(60, "Most eval utterances scored.")
    save_every: int = opt(4, "Steps between checkpoints (0: only at the end).")
    max_audio_s: float = opt(30.0, "Longer clips are rejected when loaded.")
    input: InputConfig = opt(InputConfig(), "Training and eval input (Ray Data): read-ahead window, CPUs per task.")
    max_actor_restarts: int = opt(3, "Restarts Ray gives a rollout worker or teacher scorer that crashed or was lost "
                                  "with its node (-1: no limit); the controller redoes its in-flight work, and a "
                                  "restarted rollout worker gets the current weights before it serves.")
    max_failures: int = opt(3, "Learner-group restarts after a learner rank is lost with its node (as Ray Train's "
                            "FailureConfig.max_failures): the group starts again where there is room and loads this "
                            "run's last checkpoint (save_every), and the steps since are redone on the same data "
                            "positions. Past it the job stops with one error line that says how to --resume. 0: "
                            "never restart; -1: no limit.")
    recovery_timeout_s: float = opt(600.0, "Longest wait for a lost rollout worker, teacher scorer or learner group "
                                    "to come back (Ray restarts it once a node has room, e.g. the autoscaler's "
                                    "replacement); past it the job stops with one error line naming the lost node "
                                    "and role.")
    resume: bool = opt(False, "Continue from output_dir's latest checkpoint (output_dir/checkpoints/latest), also on "
                       "another cluster: no utterance repeated or skipped.")
    overwrite: bool = opt(False, "Delete the run already in output_dir (checkpoints, metrics, summary, exports, "
                          "curves, job.log) and start a new one. Without it (or resume), an output_dir that holds a "
                          "run is refused.")
    staged_startup: bool = opt(False, "For a GPU shared by all three roles: vLLM sizes its KV cache from the memory "
                               "free while it profiles, so nothing else may allocate meanwhile. The teachers load on "
                               "the CPU concurrently and move to the GPU, and the learners start, once the rollout "
                               "engines are up. False: all three start at once.")
    skip_bad_rows: bool = opt(False, "Unusable manifest lines (bad JSON, no audio, impossible segments) stop the job "
                              "at load time with every bad line listed; true: skip them and log how many.")
    seed: int = opt(0, "Seed of the data order (the permutation of train_manifest, one per epoch) and of rollout "
                    "sampling (each clip's sampling seed derives from it and the clip's data position, so two runs "
                    "of one seed sample alike); learner.seed seeds parameter init and dropout.")
    sampling: SamplingConfig = opt(SamplingConfig(max_new_tokens=48), "Student rollout sampling (greedy by default).")
    rollout_engine: EngineConfig = opt(EngineConfig(), "Inference engine of the rollout workers (num_gpus/num_cpus: "
                                       "per rollout worker).")
    teacher_engine: EngineConfig = opt(
        EngineConfig(backend="hf", gpu_memory_utilization=0.3),
        "How each teacher scorer runs and what it asks Ray for. backend: hf (a transformers forward; the ark "
        "teacher and qwen3_asr) or vllm (teacher forcing through prompt_logprobs, qwen3_asr only; log-probs at "
        "temperature 1, so tau must be 1). num_gpus/num_cpus: per teacher actor; dtype and device: the HF "
        "forward's; gpu_memory_utilization (0.3, as open-audio-opd's training script), max_model_len (30 s of "
        "audio = 390 audio tokens) and max_num_batched_tokens: the vLLM teacher's. The other engine keys are not "
        "read by the teacher.")
    learner: LearnerConfig = opt(LearnerConfig(lr=2e-4), "Learner group (DeepSpeed) settings.")
    ray: RayConfig = opt(RayConfig(), "Ray connection.")
    s3: S3Config = opt(S3Config(), "S3 endpoint and credentials for an s3:// output_dir, manifests and audio "
                         "(default: the standard AWS environment variables of the driver, handed to every learner "
                         "rank and input task).")

    removed_keys = {
        "teacher_num_gpus": "renamed to teacher_engine.num_gpus (every role's GPU share is `num_gpus` in its "
                            "section: learner.num_gpus, rollout_engine.num_gpus, teacher_engine.num_gpus)",
        "teacher_num_cpus": "renamed to teacher_engine.num_cpus",
        "teacher_gpu_memory_utilization": "renamed to teacher_engine.gpu_memory_utilization",
        "teacher_max_model_len": "renamed to teacher_engine.max_model_len",
        "teacher_max_num_batched_tokens": "renamed to teacher_engine.max_num_batched_tokens",
    }

    def validate(self) -> None:
        if self.sampling.n != 1:
            # the teacher scores one rollout per clip and each trajectory row is one clip's data
            # position (resume and staleness count positions): for more samples per step, raise
            # rollout_batch_size
            raise ConfigError(f"sampling.n={self.sampling.n}: OPD takes one rollout per clip (sampling.n=1); "
                              "raise rollout_batch_size for more samples per step")
        for key, low in (("steps", 0), ("rollout_batch_size", 1), ("sync_every", 1), ("max_inflight", 1),
                         ("max_staleness", 0), ("topk", 1), ("num_rollout_workers", 1), ("num_teacher_workers", 1)):
            if getattr(self, key) < low:
                raise ConfigError(f"{key} must be >= {low}, got {getattr(self, key)}")
        if self.sampling.logprobs_topk not in (0, self.topk):
            # the rollout worker asks the engine for `topk` student log-probs; a second k would be ignored
            raise ConfigError(f"sampling.logprobs_topk={self.sampling.logprobs_topk} differs from topk={self.topk}: "
                              "OPD sets the student's top-k from `topk`; leave sampling.logprobs_topk at 0")
        at_least(self, 0, "eval_every", "eval_max_samples", "save_every", "teacher_logprobs_k")
        at_least(self, -1, "max_actor_restarts", "max_failures")
        need(self.recovery_timeout_s > 0, "recovery_timeout_s", f"must be > 0 seconds, got {self.recovery_timeout_s}")
        need(self.sampling.seed is None, "sampling.seed",
             f"={self.sampling.seed}: OPD seeds each clip's rollout from `seed` and the clip's data position "
             "(a redone rollout samples the same tokens); leave sampling.seed unset and set seed")
        at_least(self, 1, "keep_checkpoints")
        need(self.tau > 0, "tau", f"must be > 0, got {self.tau}")
        need(self.max_audio_s > 0, "max_audio_s", f"must be > 0, got {self.max_audio_s}")
        teacher = self.teacher_engine
        if teacher.backend == "vllm":
            need(self.teacher_backend == "qwen3_asr", "teacher_engine.backend",
                 "=vllm scores through a Qwen3-ASR vLLM engine: set teacher_backend=qwen3_asr, or "
                 "teacher_engine.backend=hf")
            need(self.tau == 1.0, "tau", f"={self.tau:g} with teacher_engine.backend=vllm: vLLM returns log-probs at "
                 "temperature 1; set tau=1 or teacher_engine.backend=hf")
        else:
            need(self.teacher_logprobs_k == 0, "teacher_logprobs_k",
                 f"={self.teacher_logprobs_k} only applies with teacher_engine.backend=vllm; leave it at 0 or set "
                 "teacher_engine.backend=vllm")
            need(teacher.max_num_batched_tokens == 0, "teacher_engine.max_num_batched_tokens",
                 f"={teacher.max_num_batched_tokens} only applies with teacher_engine.backend=vllm; leave it at 0 or "
                 "set teacher_engine.backend=vllm")
        need(self.teacher_language is None or self.teacher_backend == "qwen3_asr", "teacher_language",
             "only applies to the qwen3_asr teacher (an ark teacher takes no language prompt); leave it null")
        lr = self.learner
        gas = lr.grad_accum_steps
        need(gas == 1 or (self.steps % gas == 0 and self.save_every % gas == 0), "learner.grad_accum_steps",
             f"={gas} must divide steps ({self.steps}) and save_every ({self.save_every}): checkpoints hold no "
             "accumulated gradients")
        # fractions that add up to at most one card let Ray place learner rank 0 and an engine on one GPU
        may_share = lr.use_gpu and 0 < self.rollout_engine.num_gpus and \
            lr.num_gpus + self.rollout_engine.num_gpus <= 1
        need(not (lr.weight_sync == "broadcast" and may_share), "learner.weight_sync",
             f"=broadcast needs learner rank 0 and every rollout engine on different GPUs (NCCL refuses two "
             f"ranks on one card), but learner.num_gpus={lr.num_gpus:g} and "
             f"rollout_engine.num_gpus={self.rollout_engine.num_gpus:g} fit on one card: set "
             "learner.weight_sync=auto (ipc on a shared GPU, broadcast across GPUs) or ipc, or GPU shares that "
             "add up to more than one card")


@job_config
@dataclass
class TranscribeConfig(Validated):
    """jobs/transcribe.py and the transcriber (`ark_ray.data.build_transcriber`): decode -> engines -> part files."""
    input: str = opt("assets/demo_corpus/test.jsonl", "What to transcribe: s3://bucket/prefix or a local folder "
                     "(audio files listed recursively by extension), a .jsonl/.parquet manifest (local or s3://), "
                     "or demo://heldout (the demo's 300 held-out clips, made on first use).")
    output: str = opt("runs/transcribe", "Output folder or s3://bucket/prefix; one part file per block. "
                      "Rerunning into it skips inputs already done. The job's log (job.log) goes here, or for an "
                      "s3:// output to a local folder the job prints.")
    format: Literal["jsonl", "parquet"] = opt("jsonl", "Output file format.")
    model: Optional[str] = opt(None, "HF-format ARK-ASR directory. None: the bundled demo model "
                               "(assets/models/teacher, else assets/models/student).")
    audio_column: str = opt("audio", "The transcriber's input column: a path or URI (local, s3://), the file's "
                            "bytes, an array of samples (rate in a `sample_rate` column, else 16 kHz) or Hugging "
                            "Face's audio struct. Optional `begin_time`/`end_time` columns (seconds; negative = "
                            "unset) cut a segment.")
    extensions: list = opt(list(AUDIO_EXTENSIONS),
                           "File extensions listed as audio (case-insensitive); undecodable ones become error rows.")
    max_audio_s: float = opt(3600.0, "Longer inputs (after the segment cut) are `too_long` error rows.")
    silence_dbfs: float = opt(-60.0, "Inputs whose peak is at or below this level are flagged `silent: true` "
                              "(still transcribed: a quiet recording is data).")
    silent_is_error: bool = opt(False, "The old behaviour: silent inputs become `silent` error rows instead of "
                                "flagged transcripts.")
    num_engines: int = opt(0, "Most engine actors: the Ray Data actor pool autoscales from min_engines up to "
                           "this. 0: engines_per_gpu per GPU of the cluster when engine.num_gpus > 0, else 1.")
    min_engines: int = opt(0, "Engine actors started at once (the pool's minimum; it grows while blocks queue "
                           "up). 0: num_engines (a fixed pool).")
    engines_per_gpu: int = opt(1, "Engine actors sharing each GPU (with engine.num_gpus > 0): each gets "
                               "engine.num_gpus / N of a GPU and its share of the card's memory; they start one "
                               "after another. 1 (the default) measured faster to start and as fast to run.")
    files_per_block: int = opt(16, "Rows in each block: one decode task, one engine call, one part file (the "
                               "unit of retries and of resume).")
    engine_calls: int = opt(0, "Blocks each engine actor holds at once (threads of the actor; its feeder keeps "
                            "vLLM's continuous batching supplied from all of them). 0: enough blocks for 4 "
                            "clips per engine.max_num_seqs slot.")
    label_field: Optional[str] = opt(None, "Also copy pred_text into this column (an existing one is kept as "
                                     "`reference_<name>`) and write manifest.<format>: the successful rows, "
                                     "a training manifest for jobs/sft.py.")
    overwrite: bool = opt(False, "Delete the output's part files first instead of skipping inputs already done.")
    retry_errors: bool = opt(False, "On a rerun, try inputs whose earlier row is an error again (that row is replaced).")
    progress: bool = opt(True, "Show a progress bar.")
    quiet: bool = opt(True, "Send vLLM, Ray and transformers output to job.log instead of the terminal.")
    sampling: SamplingConfig = opt(SamplingConfig(), "Decoding (greedy by default).")
    engine: EngineConfig = opt(EngineConfig(), "Inference engine of each actor (num_gpus/num_cpus: per actor).")
    s3: S3Config = opt(S3Config(), "S3 endpoint and credentials (default: the standard AWS environment variables).")
    ray: RayConfig = opt(RayConfig(), "Ray connection.")

    removed_keys = {"as_manifest": "it was the same as label_field=text; set --label_field=text",
                    "block_audio_s": "blocks are files_per_block rows each (Ray Data batches by rows)",
                    "engine_queue_audio_s": "each engine holds engine_calls blocks at once; set --engine_calls",
                    "decode_ahead": "Ray Data's backpressure bounds the decoded blocks waiting for an engine"}

    def validate(self) -> None:
        at_least(self, 1, "files_per_block", "engines_per_gpu")
        at_least(self, 0, "num_engines", "min_engines", "engine_calls")
        need(self.min_engines <= self.num_engines or self.num_engines == 0, "min_engines",
             f"({self.min_engines}) must be <= num_engines ({self.num_engines}), or num_engines 0 (sized from the "
             "cluster's GPUs)")
        need(self.max_audio_s > 0, "max_audio_s", f"must be > 0, got {self.max_audio_s}")
        need(bool(self.extensions) and all(isinstance(e, str) and e.strip(".") for e in self.extensions),
             "extensions", f"must list at least one file extension like .wav, got {self.extensions!r}")
        need(self.label_field is None or self.label_field.strip() != "", "label_field",
             "is empty: set a column name (text for a training manifest) or leave it null")
        need(bool(self.audio_column), "audio_column", "is empty: name the column that holds the audio")

    def model_dir(self) -> str:
        """`model`, or the bundled demo teacher/student; checked in the driver, not in a remote actor."""
        return resolve_model(self.model)


def resolve_model(model: Optional[str]) -> str:
    """An HF-format model directory (absolute), or the bundled demo teacher/student when None."""
    if model is None:
        for name in ("teacher", "student"):
            cand = REPO_ROOT / "assets" / "models" / name
            if (cand / "config.json").is_file():
                return str(cand)
        raise ConfigError("model: none given and no bundled model under assets/models; pass --model=DIR")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ConfigError(f"model {model}: not an HF-format model directory (no config.json)")
    return os.path.abspath(model)


@job_config
@dataclass
class EvaluateConfig(Validated):
    """jobs/evaluate.py: WER / CER / J/WER of prediction files (jobs/transcribe.py output or any JSONL/Parquet)."""
    predictions: list = opt([], "Prediction files, or folders / URI prefixes (local, s3://, gs://) whose "
                            ".jsonl/.json/.parquet shards form one dataset each: `--predictions a.jsonl out/ "
                            "s3://b/p/` or `--predictions=[a.jsonl, out/]`.")
    output: Optional[str] = opt(None, "Write the report (per dataset, total, error rows) as JSON here.")
    normalizer: Literal["auto", "english", "basic", "chinese", "seed", "none"] = opt(
        "auto", "Text normaliser for both sides (auto: Chinese for CJK references, else Whisper English).")
    text_field: str = opt("text", "Column with the reference transcript.")
    pred_field: str = opt("pred_text", "Column with the prediction.")
    per_file: bool = opt(False, "One table row per file, also inside folders.")
    scored_dir: Optional[str] = opt(None, "Write each dataset's rows with cleaned texts and edit counts here, "
                                    "worst first (<NN>_<name>.scored.jsonl).")
    max_listed_errors: int = opt(20, "Error rows listed per dataset.")

    def validate(self) -> None:
        need(all(p not in (None, "") and not isinstance(p, (list, dict, bool)) for p in self.predictions),
             "predictions", f"must be paths or URIs, got {self.predictions!r}")
        self.predictions = [str(p) for p in self.predictions]   # `--predictions 2024` is a path too
        at_least(self, 0, "max_listed_errors")
        need(bool(self.text_field) and bool(self.pred_field) and self.text_field != self.pred_field, "pred_field",
             f"({self.pred_field!r}) and text_field ({self.text_field!r}) must name two different columns")

    def check_ready(self) -> None:
        """The one key that has no usable default (checked by the job, so `EvaluateConfig()` builds)."""
        need(bool(self.predictions), "predictions", "is empty: pass --predictions FILE_OR_DIR [...]")


@job_config
@dataclass
class PromoteConfig(Validated):
    """jobs/promote.py: gate a candidate model on held-out WER against the one a running Serve app serves, roll it out in place (optionally after a canary), or roll back."""
    candidate: Optional[str] = opt("runs/opd", "The model to promote: an HF-format ARK-ASR directory, a training run "
                                   "folder (its `final` export), or an s3:// URI of either (downloaded to model_store).")
    app: str = opt("ark-asr", "The running Serve application (its name in the Serve config).")
    eval_manifest: str = opt("assets/demo_corpus/test.jsonl", "Held-out manifest both models transcribe (JSONL or "
                             "Parquet, local or s3://; `demo://heldout[-N]`: the demo's held-out set).")
    min_gain: float = opt(0.005, "The candidate is rolled out only if its held-out WER is at least this much below "
                          "the served model's (absolute: 0.01 is one WER point) and it has no more error rows.")
    normalizer: Literal["auto", "english", "basic", "chinese", "seed", "none"] = opt(
        "auto", "Text normaliser of the WER (auto: Chinese for CJK references, else Whisper English); the WER is "
        "J/WER: CER for references in CJK scripts.")
    canary_fraction: float = opt(0.0, "Share of transcription requests the candidate serves, as a second model "
                                 "application behind the ingress, before the rollout (0: no canary).")
    canary_s: float = opt(300.0, "How long the canary serves its share before the rollout.")
    canary_max_error_ratio: float = opt(0.01, "The canary is stopped and the served model kept if the share of the "
                                        "canary's requests answered 5xx exceeds the served model's by more than this.")
    rollback: bool = opt(False, "Return the application to the model it served before the last promotion "
                         "(no scoring); if a canary was left running, only remove the canary.")
    version: Optional[str] = opt(None, "Version label of the candidate (None: its directory's name and a "
                                 "fingerprint of its files).")
    state_dir: str = opt("runs/promote", "Promotion history (<app>/history.json), cached held-out transcripts of "
                         "each model version (<app>/scores/) and job.log; local or s3://.")
    model_store: Optional[str] = opt(None, "Where an s3:// candidate is downloaded: a path every node of the cluster "
                                     "reads (shared storage). None: <state_dir>/models when state_dir is local.")
    rescore: bool = opt(False, "Transcribe the held-out set again even when a version's transcripts are cached.")
    score_engines: int = opt(1, "Engine actors transcribing the held-out set, with the application's engine "
                             "settings (the same engine kind as the replicas).")
    timeout_s: float = opt(1800.0, "Longest wait for an application to run on a new config; a rollout that does "
                           "not finish is undone (the served model's config is applied again).")
    s3: S3Config = opt(S3Config(), "S3 endpoint and credentials (s3:// candidates, manifests, state_dir).")
    ray: RayConfig = opt(RayConfig(), "Ray connection (the cluster the application runs on).")

    def validate(self) -> None:
        need(self.rollback or bool(self.candidate), "candidate", "is empty: name the model to promote "
             "(a model directory, a run folder or an s3:// URI), or pass --rollback")
        need(self.min_gain >= 0, "min_gain", f"must be >= 0 (0: not worse), got {self.min_gain}")
        need(0.0 <= self.canary_fraction <= 1.0, "canary_fraction", f"must be in [0, 1], got {self.canary_fraction}")
        at_least(self, 0, "canary_s", "canary_max_error_ratio")
        at_least(self, 1, "score_engines")
        need(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")
        need(bool(self.app), "app", "is empty: name the Serve application")
        need(self.version is None or bool(self.version.strip()), "version", "is empty: set a label or leave it null")


# <<< job configs <<<


if __name__ == "__main__":
    print(render_markdown(documented_classes()))
