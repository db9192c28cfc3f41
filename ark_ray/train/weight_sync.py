"""Every way new weights reach the inference engines, for any model size.

Three paths, each in the engine's dtype (bf16 on GPU) and in buckets of at most
`learner.weight_sync_bucket_mb` (1 GiB by default; no single message ever holds the whole model:
vLLM's RPC refuses messages over 4 GiB, and a 1.15 B model in fp32 is 4.6 GB):
  ipc          learner and engine on the same GPU: learner rank 0 packs the weights into flat GPU
               buckets and hands CUDA IPC handles to the engine processes, which copy from them
               on the device (no host round trip; as verl and OpenRLHF do for colocated vLLM).
  broadcast    different GPUs, one or more nodes: NCCL broadcast from learner rank 0 into the
               engine processes (`ark_ray.train.weight_broadcast`; gloo when asked for on CPU).
  object_store no GPU, or no NCCL path: each bucket is one object in Ray's object store; the
               rollout actor streams them into its engine one at a time.
`auto` picks per engine: ipc when it shares a GPU with learner rank 0, broadcast when both have
GPUs but different ones, else object_store.
The bucket format itself (where a bucket may be cut, how it unpacks, the CUDA IPC handle pair) is
in ark_ray/engines/weight_buckets.py, below both this module and the engines that load it.

A sync fails loudly: `WeightSync.wait` raises the receiving actor's error (after
`weight_sync_retries` retries of the whole sync), and a sync counts as done only once every
rollout actor reports the new version.

The `WeightStore` (a named actor) holds one host copy of some recent version, for rollout actors
that Ray restarts: they load it before redoing their call. Object-store syncs publish there for
free (the buckets already are objects); the other paths publish only when asked (at checkpoints),
so a sync never copies the whole model to the host.
"""
from __future__ import annotations

import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict
from typing import Iterator, Optional

import ray
import torch

from ark_ray.engines.weight_buckets import layer_key

MODES = ("ipc", "broadcast", "object_store")


# ----------------------------------------------------------------------------- the store for restarts


class WeightStore:
    """Holds the newest published weights (a list of bucket object refs) and their version, by name."""

    def __init__(self):
        self.refs: Optional[list] = None
        self.version = 0

    def publish(self, refs: list, version: int) -> None:
        if version >= self.version:
            self.refs, self.version = list(refs), version

    def latest(self) -> tuple[Optional[list], int]:
        return self.refs, self.version


WeightStore = ray.remote(num_cpus=0)(WeightStore)


# ----------------------------------------------------------------------------- buckets


def bucket_plan(params: list[tuple[str, torch.Tensor]], bucket_bytes: int,
                dtype: Optional[torch.dtype] = None) -> list[dict]:
    """Consecutive parameters packed into flat buckets of at most `bucket_bytes` (a bucket holds one
    dtype: `dtype` for all when given, else each parameter's own). A layer is never split across
    buckets; a single layer larger than `bucket_bytes` gets a bucket of its own."""
    groups: list[list[tuple[str, tuple, str, int]]] = []
    for name, p in params:
        shape = tuple(p.ds_shape if hasattr(p, "ds_shape") else p.shape)  # ZeRO-3: the full shape
        dt = dtype or p.dtype
        nbytes = torch.empty((), dtype=dt).element_size() * int(torch.Size(shape).numel())
        item = (name, shape, str(dt).removeprefix("torch."), nbytes)
        if groups and layer_key(groups[-1][-1][0]) == layer_key(name) and groups[-1][-1][2] == item[2]:
            groups[-1].append(item)
        else:
            groups.append([item])
    buckets: list[dict] = []
    size = 0
    for g in groups:
        g_bytes = sum(i[3] for i in g)
        if not buckets or buckets[-1]["dtype"] != g[0][2] or (size + g_bytes > bucket_bytes and buckets[-1]["items"]):
            buckets.append({"dtype": g[0][2], "items": []})
            size = 0
        buckets[-1]["items"].extend((n, s) for n, s, _, _ in g)
        size += g_bytes
    return buckets


def sync_params(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What a sync sends: every parameter in the real checkpoint layout but the tied head."""
    return [(n, p) for n, p in module.named_parameters() if n != "lm_head.weight"]


def flat_buckets(module: torch.nn.Module, plan: list[dict], *, zero3: bool, build: bool = True,
                 device: Optional[torch.device] = None) -> Iterator[tuple[dict, Optional[torch.Tensor]]]:
    """(bucket, flat tensor in the bucket's dtype) for each bucket of `plan`, on the parameters'
    device (or `device`). Under ZeRO-3 every rank must iterate (the gathers are collective); ranks
    with build=False get None."""
    by_name = dict(sync_params(module))
    for bucket in plan:
        ps = [by_name[name] for name, _ in bucket["items"]]
        if zero3:
            import deepspeed
            ctx = deepspeed.zero.GatheredParameters(ps, modifier_rank=None)
        else:
            ctx = nullcontext()
        with ctx:
            if not build:
                yield bucket, None
                continue
            dt = getattr(torch, bucket["dtype"])
            flat = torch.cat([p.data.reshape(-1).to(device=device or p.device, dtype=dt) for p in ps])
        yield bucket, flat


# ----------------------------------------------------------------------------- object store


def put_buckets(module: torch.nn.Module, plan: list[dict], *, zero3: bool, build: bool) -> list:
    """Each bucket as one object (host memory, the plan's dtype); the refs, in order."""
    refs = []
    for bucket, flat in flat_buckets(module, plan, zero3=zero3, build=build):
        if flat is not None:
            refs.append(ray.put({"items": bucket["items"], "dtype": bucket["dtype"], "flat": flat.cpu()}))
    return refs


# ----------------------------------------------------------------------------- where things run


def placement() -> dict:
    """This process's node and the GPUs Ray gave it (empty on CPU)."""
    ctx = ray.get_runtime_context()
    return {"node": ctx.get_node_id(), "gpus": sorted(str(g) for g in ray.get_gpu_ids())}


def resolve_mode(requested: str, learner: dict, engine: dict) -> str:
    """The path for one engine, from where learner rank 0 and the engine run."""
    shared = learner["node"] == engine["node"] and set(learner["gpus"]) & set(engine["gpus"])
    if requested == "auto":
        if learner["gpus"] and engine["gpus"]:
            return "ipc" if shared else "broadcast"
        return "object_store"
    if requested == "ipc" and not shared:
        raise ValueError("learner.weight_sync=ipc needs the rollout engine on learner rank 0's GPU "
                         f"(learner {learner}, engine {engine})")
    if requested == "broadcast" and shared and learner["gpus"]:
        raise ValueError("learner.weight_sync=broadcast cannot use NCCL between processes on one GPU "
                         f"(learner {learner}, engine {engine}); use auto or ipc")
    return requested


# ----------------------------------------------------------------------------- the driver's side


class SyncFailed(RuntimeError):
    """A sync that failed on a receiver after every retry (carries that receiver's error)."""


class WeightSync:
    """The driver's handle: pushes a version to every rollout actor and checks they all took it.

    `push` only queues the calls (each actor applies them between two of its rollouts, in order);
    `poll` collects a finished sync without blocking; `wait` blocks until all are done. One sync is
    in flight at a time and pushes meanwhile coalesce into the newest, so the learner never waits
    for a worker busy with a rollout and a worker never falls behind by queued syncs.
    """

    def __init__(self, learners: list, cfg, targets: list, store=None):
        self.learners, self.cfg, self.targets, self.store = learners, cfg, targets, store
        self.bucket_bytes = int(cfg.weight_sync_bucket_mb * 2**20)
        self.modes: Optional[list[str]] = None
        self.infos: list[dict] = []
        self.spec: Optional[dict] = None
        self.pending: deque = deque()          # the sync in flight (at most one)
        self.deferred: Optional[int] = None    # the newest version pushed while one was in flight
        self.versions: dict[int, int] = {}    # rollout actor index -> version it last reported
        self.history: list[dict] = []         # one record per finished sync

    # -- setup
    def _resolve(self) -> None:
        learner = ray.get(self.learners[0].placement.remote())
        self.infos = ray.get([t.engine_info.remote() for t in self.targets])
        self.modes = [resolve_mode(self.cfg.weight_sync, learner, i) for i in self.infos]
        dtypes = {i["dtype"] for i in self.infos}
        if len(dtypes) > 1:
            raise ValueError(f"rollout engines disagree on their dtype: {sorted(dtypes)}")
        self.dtype = dtypes.pop()
        if "broadcast" in self.modes:
            ranks = {i["ranks"] for m, i in zip(self.modes, self.infos) if m == "broadcast"}
            if len(ranks) > 1:
                raise ValueError(f"broadcast needs the same engine processes per actor, got {sorted(ranks)}")
            self.ranks_per_target = ranks.pop()
            self.spec = asdict(ray.get(self.learners[0].weight_sync_store.remote()))

    def describe(self) -> str:
        if self.modes is None:
            self._resolve()
        return ", ".join(sorted(set(self.modes)))

    # -- one sync
    def _start(self, version: int, only: Optional[list[int]] = None) -> dict:
        """Queue version `version` for the actors `only` (default: all); returns the attempt."""
        if self.modes is None:
            self._resolve()
        idx = list(range(len(self.targets))) if only is None else only
        by_mode = {m: [i for i in idx if self.modes[i] == m] for m in MODES}
        a = {"version": version, "t0": time.perf_counter(), "learner": [], "targets": {}, "exports": {}}
        args = (version, self.dtype, self.bucket_bytes)
        for mode in ("ipc", "object_store"):
            if by_mode[mode]:
                refs = [w.export_weights.remote(mode, *args) for w in self.learners]
                a["learner"] += refs
                a["exports"][mode] = refs[0]
                for i in by_mode[mode]:
                    a["targets"][i] = self.targets[i].load_weights.remote(mode, refs[0], version)
        if by_mode["broadcast"]:
            # every broadcast actor takes part in each broadcast sync (a group's membership is fixed)
            bc = [i for i, m in enumerate(self.modes) if m == "broadcast"]
            a["learner"] += [w.broadcast_weights.remote(version, len(bc), self.ranks_per_target, *args[1:])
                             for w in self.learners]
            for j, i in enumerate(bc):
                a["targets"][i] = self.targets[i].receive_broadcast.remote(self.spec, j, version,
                                                                           self.ranks_per_target)
        return a

    def push(self, version: int) -> None:
        """Queue the sync of `version` without blocking. One sync is in flight at a time; a push
        while one is in flight is deferred, and a newer push replaces a deferred one (the workers
        get the newest weights as soon as they take the next sync; skipped versions are never sent)."""
        self.poll()
        if self.pending:
            self.deferred = version
            return
        self.pending.append(self._start(version))

    def _next(self) -> None:
        if not self.pending and self.deferred is not None:
            version, self.deferred = self.deferred, None
            self.pending.append(self._start(version))

    def poll(self) -> Optional[dict]:
        """Collect a finished sync without blocking (raising its error if it failed) and start the
        deferred one; the finished sync's record, or None."""
        rec = None
        while self.pending:
            a = self.pending[0]
            refs = list(a["targets"].values()) + a["learner"]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            if len(ready) < len(refs):
                break
            rec = self._finish(self.pending.popleft())
            self._next()
        return rec

    def wait(self) -> Optional[dict]:
        """Block until the in-flight and deferred syncs are done on every actor; the newest record."""
        rec = None
        while self.pending or self.deferred is not None:
            while self.pending:
                rec = self._finish(self.pending.popleft())
            self._next()
        return rec

    def _finish(self, a: dict) -> dict:
        """Wait for one sync; retry its failures; check every actor reports its version."""
        version = a["version"]
        attempts = 0
        while True:
            errors: dict[int, BaseException] = {}
            results: dict[int, dict] = {}
            learner_error = None
            try:
                learner_res = ray.get(a["learner"])
            except Exception as e:  # the learner's side (export or broadcast) failed
                learner_res, learner_error = [], e
            for i, ref in a["targets"].items():
                try:
                    results[i] = ray.get(ref)
                except Exception as e:
                    errors[i] = e
            for i, r in results.items():
                if r.get("version", -1) < version:
                    errors[i] = RuntimeError(f"rollout worker {i} reports v{r.get('version')} after the sync "
                                             f"of v{version}")
            if not errors and learner_error is None:
                break
            attempts += 1
            if attempts > self.cfg.weight_sync_retries:
                self._release(version)
                if errors:
                    i, err = next(iter(errors.items()))
                    raise SyncFailed(f"weight sync of v{version} failed on rollout worker {i} "
                                     f"({self.modes[i]}) after {attempts} attempt(s): {err}") from err
                raise SyncFailed(f"weight sync of v{version} failed on the learner after {attempts} "
                                 f"attempt(s): {learner_error}") from learner_error
            failed = sorted(errors) or sorted(a["targets"])
            if any(self.modes[i] == "broadcast" for i in failed):   # a broadcast is all or nothing
                failed = sorted(set(failed) | {i for i, m in enumerate(self.modes) if m == "broadcast"})
            kept = {**a.get("kept", {}), **{i: r for i, r in results.items() if i not in failed}}
            a = self._start(version, only=failed)
            a["kept"] = kept
        results.update(a.get("kept", {}))
        for i, r in results.items():
            self.versions[i] = r["version"]
        ok = [r for r in learner_res if r.get("status") != "skipped"]
        export_s = max([r.get("seconds", 0.0) for r in ok] or [0.0])
        load_s = max([r.get("seconds", 0.0) for r in results.values()] or [0.0])
        rec = {"version": version, "modes": sorted(set(self.modes)), "retries": attempts,
               "export_s": export_s, "load_s": load_s, "sync_s": export_s + load_s,
               "bytes": max([r.get("bytes", 0) for r in ok] or [0]),
               "wall_s": time.perf_counter() - a["t0"]}
        if "object_store" in a["exports"] and self.store is not None:  # free: the buckets are objects
            exported = ray.get(a["exports"]["object_store"])
            ray.get(self.store.publish.remote(exported["refs"], version))
        self._release(version)
        self.history.append(rec)
        return rec

    def _release(self, version: int) -> None:
        ray.get([w.release_weights.remote(version) for w in self.learners])

    def publish(self, version: int) -> None:
        """One host copy of the current weights into the WeightStore (checkpoints; restarts load it)."""
        if self.store is None:
            return
        self.wait()   # no sync in flight: its buffers are released by version, like this export's
        if self.modes is None:
            self._resolve()
        res = ray.get([w.export_weights.remote("object_store", version, self.dtype, self.bucket_bytes)
                       for w in self.learners])
        ray.get(self.store.publish.remote(res[0]["refs"], version))
        self._release(version)   # the store now holds the bucket refs; they live while it does


__all__ = ["WeightStore", "WeightSync", "SyncFailed", "bucket_plan", "flat_buckets", "put_buckets",
           "placement", "resolve_mode", "sync_params"]
