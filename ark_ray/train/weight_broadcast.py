"""Collective weight broadcast: learner rank 0 broadcasts into the engine processes of rollout actors.

Used by `ark_ray.train.weight_sync` when the learner and an engine sit on different GPUs (NCCL) or
on CPU when asked for (gloo: the CPU tests run the protocol the GPU box runs). The tensors go once,
straight into the process that runs the model, the way OpenRLHF and verl sync vLLM.

Group: a standalone process group, `TCPStore` + `ProcessGroupGloo` / `ProcessGroupNCCL`; the
default groups that DeepSpeed (learners) and vLLM (its workers) own are never touched. Learner
rank 0 hosts the store for the whole run and is rank 0 of the group; receiver i owns ranks
1 + i*w ... (w vLLM workers per engine). The receiving side runs inside each vLLM worker process,
sent there with `collective_rpc`.

One sync (version v) is one call per actor (learner ranks: `broadcast_weights`, rollout actors:
`receive_broadcast`), coordinated through keys of the store:
  learner:    meta/v = the bucket plan (names, dtype, shapes), before any tensor
  receivers:  ready/v/i = b"in:<group>" (a member of that group) or b"new"
  learner:    once every receiver is ready, go/v = {"action": "go"} when all are members of its
              live group, else {"action": "form", group, world}: everyone builds a new group now,
              with every peer known to be waiting (nobody blocks on a peer that is not coming).
              Then flat buckets (in the engine's dtype) are broadcast; each receiver streams them
              into its engine and drops the engine's encoder and prefix caches.
  failure:    a peer died mid-broadcast (bounded by the collective timeout), or a restarted actor
              arrived after the learner finished (done/v is set): both ends raise, the sync fails
              and `WeightSync` retries it; the retry forms a new group, since a communicator's
              membership is fixed and a restarted process cannot slip into the live one.
  lost:       a receiver lost with its node before it reached the sync would hold everyone up to
              `timeout_s`; the driver marks its place instead (`abort_receivers`: ready/v/i =
              b"lost"), the learner announces go/v = {"action": "abort"}, every side raises at
              once, and `WeightSync` redoes the sync without it.
"""
from __future__ import annotations

import datetime
import pickle
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

_RECEIVER: Optional["Channel"] = None   # this process's receiving end (a vLLM worker or an HF rollout actor)
_KEEP_VERSIONS = 2                      # store keys of older syncs are deleted


@dataclass(frozen=True)
class StoreSpec:
    """Where the learner's store listens and how groups are built (sent as a plain dict)."""
    host: str
    port: int
    backend: str                 # "gloo" (CPU) or "nccl" (GPU)
    timeout_s: float             # waiting for every receiver to reach a sync
    collective_timeout_s: float  # forming a group, one bucket's broadcast

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)

    @property
    def collective_timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.collective_timeout_s)


def _spec(spec: StoreSpec | dict) -> StoreSpec:
    return spec if isinstance(spec, StoreSpec) else StoreSpec(**spec)


def _keys(spec: StoreSpec, base: Optional[dist.Store] = None) -> dist.Store:
    """The sync's key space: a client of the learner's TCPStore (or, on the learner, the master)."""
    if base is None:
        base = dist.TCPStore(spec.host, spec.port, None, False, spec.timeout, wait_for_workers=False)
    return dist.PrefixStore("wsync/", base)


class Channel:
    """One rank's membership of one group."""

    def __init__(self, name: str, rank: int, world: int, pg):
        self.name, self.rank, self.world, self.pg = name, rank, world, pg

    @classmethod
    def join(cls, spec: StoreSpec, keys: dist.Store, name: str, rank: int, world: int) -> "Channel":
        """Build the standalone group (constructors torch 2.11 and 2.13 share); blocks until all joined."""
        store = dist.PrefixStore(f"pg/{name}/", keys)
        if spec.backend == "gloo":
            pg = dist.ProcessGroupGloo(store, rank, world, spec.collective_timeout)
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = spec.collective_timeout
            pg = dist.ProcessGroupNCCL(store, rank, world, opts)
        return cls(name, rank, world, pg)

    def broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        self.pg.broadcast([tensor], opts).wait()

    def close(self) -> None:
        """Drop the group: peers still waiting in a collective fail instead of hanging."""
        pg, self.pg = self.pg, None
        if pg is not None and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except Exception:  # not every backend/version has it; dropping the object closes it
                pass


# ----------------------------------------------------------------------------- learner side


class Sender:
    """Learner rank 0's end: hosts the store, gathers the receivers, forms groups, broadcasts."""

    def __init__(self, host: str, backend: str, timeout_s: float, collective_timeout_s: float):
        # port 0: the OS picks a free port on this node; the driver learns it from `spec`
        master = dist.TCPStore(host, 0, None, True, datetime.timedelta(seconds=timeout_s),
                               wait_for_workers=False)
        self.master = master
        self.spec = StoreSpec(host=host, port=master.port, backend=backend, timeout_s=timeout_s,
                              collective_timeout_s=collective_timeout_s)
        self.keys = _keys(self.spec, master)
        self.channel: Optional[Channel] = None
        self.formations = 0

    def begin(self, version: int, plan: list[dict], n_targets: int, ranks_per_target: int) -> None:
        """Publish the plan, wait for every receiver, then announce go or a new group (and form it)."""
        k = self.keys
        k.set(f"meta/{version}", pickle.dumps(plan))
        ready = [f"ready/{version}/{i}" for i in range(n_targets)]
        k.wait(ready, self.spec.timeout)
        answers = [k.get(r) for r in ready]
        lost = [i for i, a in enumerate(answers) if a == b"lost"]
        if lost:
            k.set(f"go/{version}", pickle.dumps({"action": "abort", "lost": lost}))
            raise RuntimeError(f"weight sync v{version} aborted: receiver(s) {lost} were lost before it")
        world = 1 + n_targets * ranks_per_target
        ch = self.channel
        if ch is not None and ch.pg is not None and ch.world == world and \
                all(a == f"in:{ch.name}".encode() for a in answers):
            k.set(f"go/{version}", pickle.dumps({"action": "go"}))
            return
        if ch is not None:
            ch.close()
        self.channel = None
        name = f"g{version}-{self.formations}"
        k.set(f"go/{version}", pickle.dumps({"action": "form", "group": name, "world": world}))
        self.channel = Channel.join(self.spec, k, name, 0, world)
        self.formations += 1

    def finish(self, version: int, n_targets: int) -> None:
        """Mark `version` done (a late receiver fails instead of waiting) and forget old keys."""
        self.keys.set(f"done/{version}", b"1")
        old = version - _KEEP_VERSIONS
        for key in [f"meta/{old}", f"go/{old}", f"done/{old}"] + [f"ready/{old}/{i}" for i in range(n_targets)]:
            try:
                self.keys.delete_key(key)
            except Exception:  # absent: nothing to delete
                pass


def send_weights(module: torch.nn.Module, plan: list[dict], version: int, *, sender: Optional[Sender],
                 n_targets: int, ranks_per_target: int, zero3: bool) -> dict:
    """Broadcast `module`'s parameters as `version`, bucket by bucket, in each bucket's dtype.
    Under ZeRO-3 every learner rank calls this (the gathers are collective); only the rank holding
    `sender` talks to the receivers. Raises when the broadcast fails (after marking the version
    done, so no receiver waits for it)."""
    from ark_ray.train.weight_sync import flat_buckets

    t0 = time.perf_counter()
    formed_before = sender.formations if sender is not None else 0
    sent = 0
    try:
        if sender is not None:
            sender.begin(version, plan, n_targets, ranks_per_target)
        for _, flat in flat_buckets(module, plan, zero3=zero3, build=sender is not None):
            if flat is not None:
                sender.channel.broadcast(flat)
                sent += flat.numel() * flat.element_size()
    except Exception:
        if sender is not None:
            if sender.channel is not None:
                sender.channel.close()
            sender.finish(version, n_targets)
        raise
    if sender is None:
        return {"status": "skipped", "version": version}
    sender.finish(version, n_targets)
    return {"status": "ok", "version": version, "bytes": sent, "formed": sender.formations > formed_before,
            "formations": sender.formations, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- receiving side


def _receive_stream(ch: Channel, plan: list[dict], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) as buckets arrive. Each bucket gets fresh memory: vLLM's layer-wise reload
    keeps the tensors of a layer until all of it has arrived."""
    for bucket in plan:
        numels = [int(torch.Size(shape).numel()) for _, shape in bucket["items"]]
        flat = torch.empty(sum(numels), dtype=getattr(torch, bucket["dtype"]), device=device)
        ch.broadcast(flat)
        off = 0
        for (name, shape), n in zip(bucket["items"], numels):
            yield name, flat[off:off + n].view(shape)
            off += n


def _prepare(spec: dict, version: int, group: Optional[dict], rank: int) -> tuple[Channel, list[dict]]:
    """This process's channel for the sync (joining `group` first when one is being formed) and the plan."""
    global _RECEIVER
    sp = _spec(spec)
    keys = _keys(sp)
    if group is not None:
        if _RECEIVER is not None:
            _RECEIVER.close()
        _RECEIVER = None
        _RECEIVER = Channel.join(sp, keys, group["group"], rank, group["world"])
    if _RECEIVER is None or _RECEIVER.pg is None:
        raise RuntimeError("this process is in no live weight-sync group")
    return _RECEIVER, pickle.loads(keys.get(f"meta/{version}"))


def _worker_receive(worker, spec: dict, version: int, group: Optional[dict], base_rank: int) -> int:
    """Inside a vLLM worker process (collective_rpc): receive `version` into its model, joining
    `group` first (as base_rank + the worker's own rank) when one is being formed."""
    from ark_ray.engines.vllm_engine import load_into_worker, worker_device

    ch, plan = _prepare(spec, version, group, base_rank + int(getattr(worker, "rank", 0) or 0))
    names = [name for b in plan for name, _ in b["items"]]
    try:
        return load_into_worker(worker, _receive_stream(ch, plan, worker_device(worker)), names)
    except Exception:
        ch.close()   # a half-received sync leaves the group unusable; the retry forms a new one
        raise


def receive(engine, spec: dict, index: int, version: int, group: Optional[str], ranks: int = 1) -> Optional[str]:
    """One rollout actor's side of a sync. `group`: the group its engine is in (None: none).
    Returns the group the engine is in afterwards; raises when `version` did not arrive."""
    sp = _spec(spec)
    keys = _keys(sp)
    keys.set(f"ready/{version}/{index}", f"in:{group}".encode() if group else b"new")
    keys.wait([f"go/{version}"], sp.timeout)
    if keys.check([f"done/{version}"]):
        raise RuntimeError(f"the learner finished v{version} without this actor")
    go = pickle.loads(keys.get(f"go/{version}"))
    if go["action"] == "abort":
        raise RuntimeError(f"weight sync v{version} aborted: receiver(s) {go['lost']} were lost before it")
    form = go if go["action"] == "form" else None
    if form is None and group is None:
        raise RuntimeError(f"v{version} went out on a group this actor is not in")
    llm = getattr(engine, "llm", None)
    base_rank = 1 + index * ranks
    if llm is not None:  # vLLM: the model lives in the worker processes
        done = llm.collective_rpc(_worker_receive, args=(dict(spec), version, form, base_rank))
        if len(done) != ranks:
            raise RuntimeError(f"{len(done)} engine processes took part, the group expects {ranks}")
        engine.reset_caches()
    else:  # an in-process engine (HFEngine)
        ch, plan = _prepare(spec, version, form, base_rank)
        engine.update_weights(_receive_stream(ch, plan, next(engine.model.parameters()).device))
    return form["group"] if form else group


def abort_receivers(spec: StoreSpec | dict, version: int, indices: list[int]) -> None:
    """The driver's side: mark receivers `indices` of sync `version` as lost, so the learner (still
    waiting for them to get ready) aborts the sync instead of waiting out its timeout. A receiver
    that was already in the broadcast is past that wait; its loss ends the collective instead."""
    keys = _keys(_spec(spec))
    for i in indices:
        keys.compare_set(f"ready/{version}/{i}", "", b"lost")


__all__ = ["StoreSpec", "Channel", "Sender", "send_weights", "receive", "abort_receivers"]
