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

Lost actors (their node vanished) are not failures: a receiver lost mid-sync is left out (`lost`:
the sync completes for the others; a broadcast in flight is aborted and redone without it, so
nobody waits for it), and the job pushes the current weights to it once Ray has restarted it
(`recovered`, then the next `push`), before it serves again. A learner rank lost mid-sync raises
`LearnerLost`. No host copy of the weights is kept for restarts: a restarted actor gets the
learner's current weights, never a stale checkpoint's.
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
    """This process's node, the GPUs Ray gave it (empty on CPU) and its pid (a restart changes it)."""
    import os

    ctx = ray.get_runtime_context()
    return {"node": ctx.get_node_id(), "gpus": sorted(str(g) for g in ray.get_gpu_ids()), "pid": os.getpid()}


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
    Targets in `lost` (their node vanished) are left out of syncs until `recovered`.
    """

    def __init__(self, learners: list, cfg, targets: list, learner_nodes: Optional[list] = None):
        self.learners, self.cfg, self.targets = learners, cfg, targets
        self.learner_nodes = learner_nodes or [None] * len(learners)
        self.bucket_bytes = int(cfg.weight_sync_bucket_mb * 2**20)
        self.modes: Optional[list[Optional[str]]] = None
        self.infos: list[dict] = []
        self.learner_info: Optional[dict] = None
        self.spec: Optional[dict] = None
        self.pending: deque = deque()          # the sync in flight (at most one)
        self.deferred: Optional[int] = None    # the newest version pushed while one was in flight
        self.versions: dict[int, int] = {}    # rollout actor index -> version it last reported
        self.lost: dict[int, BaseException] = {}   # rollout actor index -> the error that lost it
        self._back_at: dict[int, float] = {}       # rollout actor index -> when it was last recovered
        self.history: list[dict] = []         # one record per finished sync

    # -- setup
    def _resolve(self, only: Optional[list[int]] = None) -> None:
        """Where learner rank 0 and the engines run -> each engine's path (all, or `only` these again)."""
        if self.learner_info is None:
            self.learner_info = self._learner_get([self.learners[0].placement.remote()])[0]
        idx = [i for i in range(len(self.targets)) if i not in self.lost] if only is None else only
        if self.modes is None:
            self.modes, self.infos = [None] * len(self.targets), [{} for _ in self.targets]
        from ark_ray.faults import is_lost

        for i, ref in [(i, self.targets[i].engine_info.remote()) for i in idx]:
            try:
                self.infos[i] = ray.get(ref)
            except Exception as e:
                if not is_lost(e):
                    raise
                self.mark_lost(i, e)      # resolved when it is back (`recovered`)
                continue
            self.modes[i] = resolve_mode(self.cfg.weight_sync, self.learner_info, self.infos[i])
        dtypes = {self.infos[i]["dtype"] for i, m in enumerate(self.modes) if m is not None}
        if len(dtypes) > 1:
            raise ValueError(f"rollout engines disagree on their dtype: {sorted(dtypes)}")
        if dtypes:
            self.dtype = dtypes.pop()
        if "broadcast" in self.modes:
            ranks = {self.infos[i]["ranks"] for i, m in enumerate(self.modes) if m == "broadcast"}
            if len(ranks) > 1:
                raise ValueError(f"broadcast needs the same engine processes per actor, got {sorted(ranks)}")
            self.ranks_per_target = ranks.pop()
            if self.spec is None:
                self.spec = asdict(self._learner_get([self.learners[0].weight_sync_store.remote()])[0])

    def describe(self) -> str:
        if self.modes is None:
            self._resolve()
        return ", ".join(sorted({m for m in self.modes if m is not None}))

    def _learner_get(self, refs: list) -> list:
        """The learner ranks' results; a rank lost with its node raises LearnerLost."""
        from ark_ray.faults import LearnerLost, is_lost

        out = []
        for r, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except Exception as e:
                if is_lost(e):
                    raise LearnerLost(r, self.learner_nodes[r], e) from e
                raise
        return out

    # -- lost targets
    def mark_lost(self, i: int, error: BaseException, sent_at: Optional[float] = None) -> None:
        """Leave rollout actor `i` out of syncs (its node was lost) until `recovered(i)`; a failed call
        `sent_at` (perf_counter) before its last recovery tells nothing new and is ignored."""
        if sent_at is not None and self._back_at.get(i, float("-inf")) > sent_at:
            return
        self.lost.setdefault(i, error)
        self.versions.pop(i, None)

    def recovered(self, i: int) -> None:
        """Rollout actor `i` answers again (restarted, maybe elsewhere): its path is resolved anew,
        and the next push includes it."""
        self.lost.pop(i, None)
        self.versions.pop(i, None)
        self._back_at[i] = time.perf_counter()
        if self.modes is not None:
            self._resolve(only=[i])

    # -- one sync
    def _start(self, version: int, only: Optional[list[int]] = None) -> dict:
        """Queue version `version` for the actors `only` (default: all that are not lost); returns the
        attempt."""
        if self.modes is None:
            self._resolve()
        idx = [i for i in (range(len(self.targets)) if only is None else only) if i not in self.lost]
        by_mode = {m: [i for i in idx if self.modes[i] == m] for m in MODES}
        a = {"version": version, "t0": time.perf_counter(), "learner": [], "targets": {}, "exports": {},
             "bc_index": {}, "aborted": set()}
        args = (version, self.dtype, self.bucket_bytes)
        for mode in ("ipc", "object_store"):
            if by_mode[mode]:
                refs = [w.export_weights.remote(mode, *args) for w in self.learners]
                a["learner"] += refs
                a["exports"][mode] = refs[0]
                for i in by_mode[mode]:
                    a["targets"][i] = self.targets[i].load_weights.remote(mode, refs[0], version)
        if by_mode["broadcast"]:
            # every broadcast actor that is not lost takes part (a group's membership is fixed: a
            # changed set of receivers forms a new group)
            bc = [i for i, m in enumerate(self.modes) if m == "broadcast" and i not in self.lost]
            a["learner"] += [w.broadcast_weights.remote(version, len(bc), self.ranks_per_target, *args[1:])
                             for w in self.learners]
            for j, i in enumerate(bc):
                a["bc_index"][i] = j
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
        deferred one; the finished sync's record, or None. A broadcast receiver found lost meanwhile
        has its place in the broadcast aborted, so the learner and the others stop waiting for it."""
        rec = None
        while self.pending:
            a = self.pending[0]
            refs = list(a["targets"].values()) + a["learner"]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            if len(ready) < len(refs):
                self._abort_lost_receivers(a, set(ready))
                break
            rec = self._finish(self.pending.popleft())
            self._next()
        return rec

    def _abort_lost_receivers(self, a: dict, ready: set) -> None:
        from ark_ray.faults import is_lost

        for i, ref in a["targets"].items():
            if i not in a["bc_index"] or i in a["aborted"] or ref not in ready:
                continue
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - only a lost receiver is acted on here
                if is_lost(e):
                    from ark_ray.train.weight_broadcast import abort_receivers

                    abort_receivers(self.spec, a["version"], [a["bc_index"][i]])
                    a["aborted"].add(i)

    def wait(self) -> Optional[dict]:
        """Block until the in-flight and deferred syncs are done on every actor; the newest record."""
        rec = None
        while self.pending or self.deferred is not None:
            while self.pending:
                a = self.pending[0]
                if a["bc_index"]:   # lost broadcast receivers must not hold the others up
                    while True:
                        refs = list(a["targets"].values()) + a["learner"]
                        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=1.0)
                        if len(ready) == len(refs):
                            break
                        self._abort_lost_receivers(a, set(ready))
                rec = self._finish(self.pending.popleft())
            self._next()
        return rec

    def _finish(self, a: dict) -> dict:
        """Wait for one sync; leave out lost receivers; retry failures; check every actor reports its
        version. A learner rank lost meanwhile raises LearnerLost."""
        from ark_ray.faults import LearnerLost, is_lost

        version = a["version"]
        attempts = 0
        lost_here: list[int] = []
        while True:
            errors: dict[int, BaseException] = {}
            results: dict[int, dict] = {}
            learner_error = None
            learner_res = []
            for r, ref in enumerate(a["learner"]):
                try:
                    learner_res.append(ray.get(ref))
                except Exception as e:  # the learner's side (export or broadcast) failed
                    if is_lost(e):
                        self._release(version)
                        raise LearnerLost(r % len(self.learners), self.learner_nodes[r % len(self.learners)],
                                          e) from e
                    learner_error = learner_error or e
            lost_now = []
            for i, ref in a["targets"].items():
                try:
                    results[i] = ray.get(ref)
                except Exception as e:
                    if is_lost(e):
                        self.mark_lost(i, e, sent_at=a["t0"])
                        lost_now.append(i)
                    else:
                        errors[i] = e
            lost_here += lost_now
            for i, r in results.items():
                if r.get("version", -1) < version:
                    errors[i] = RuntimeError(f"rollout worker {i} reports v{r.get('version')} after the sync "
                                             f"of v{version}")
            if lost_now and any(i in a["bc_index"] for i in lost_now):
                # a broadcast fails on every side when one receiver is lost: redo it without that one
                errors = {i: e for i, e in errors.items() if i not in a["bc_index"]}
                redo = [i for i in a["bc_index"] if i not in self.lost]
                learner_error = None
                if redo or errors:
                    kept = {**a.get("kept", {}), **{i: r for i, r in results.items()
                                                    if i not in redo and i not in errors}}
                    a = self._start(version, only=redo + sorted(errors))
                    a["kept"] = kept
                    continue
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
            failed = sorted(errors) or sorted(i for i in a["targets"] if i not in self.lost)
            if any(self.modes[i] == "broadcast" for i in failed):   # a broadcast is all or nothing
                failed = sorted(set(failed) | {i for i, m in enumerate(self.modes)
                                               if m == "broadcast" and i not in self.lost})
            kept = {**a.get("kept", {}), **{i: r for i, r in results.items() if i not in failed}}
            a = self._start(version, only=failed)
            a["kept"] = kept
        results.update(a.get("kept", {}))
        results = {i: r for i, r in results.items() if i not in self.lost}
        for i, r in results.items():
            self.versions[i] = r["version"]
        ok = [r for r in learner_res if r.get("status") != "skipped"]
        export_s = max([r.get("seconds", 0.0) for r in ok] or [0.0])
        load_s = max([r.get("seconds", 0.0) for r in results.values()] or [0.0])
        rec = {"version": version, "modes": sorted({m for m in self.modes if m is not None}), "retries": attempts,
               "export_s": export_s, "load_s": load_s, "sync_s": export_s + load_s,
               "bytes": max([r.get("bytes", 0) for r in ok] or [0]),
               "wall_s": time.perf_counter() - a["t0"], "lost": sorted(set(lost_here))}
        self._release(version)
        self.history.append(rec)
        return rec

    def _release(self, version: int) -> None:
        self._learner_get([w.release_weights.remote(version) for w in self.learners])


__all__ = ["WeightSync", "SyncFailed", "bucket_plan", "flat_buckets", "put_buckets", "placement", "resolve_mode",
           "sync_params"]
