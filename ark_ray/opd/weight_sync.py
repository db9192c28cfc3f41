"""Collective weight sync: learner rank 0 broadcasts into the engine processes of every RolloutWorker.

Why: the object-store path (`ray.put` of a state dict, each rollout actor reads it and ships it
to its vLLM process) copies the whole model through host memory several times per sync. The
broadcast moves it once, straight into the process that runs the model, the way OpenRLHF and
verl sync vLLM; on GPUs over NCCL, on CPU over gloo. One code path for both, so the CPU tests
run the protocol the GPU box runs.

Group: a standalone process group, `TCPStore` + `ProcessGroupGloo` / `ProcessGroupNCCL`; the
default groups that DeepSpeed (learners) and vLLM (its workers) own are never touched. Rank 0 is
learner rank 0 (it hosts the store); rollout worker i owns ranks 1 + i*w ... (w vLLM workers per
engine; the receiving side runs inside each vLLM worker process, sent there by collective_rpc).

One sync (version v) through keys of the store:
  learner:    meta/v = the bucket plan (names, dtypes, shapes), sent before any tensor
  receivers:  ready/v/i = "in" (member of the live group) or "out" (a restarted actor)
  learner:    waits for every ready key, then go/v = "go" (all in) or "abort"
  go:         flat buckets are broadcast; each receiver streams them into the same loader as
              VllmEngine.update_weights (reload_weights / in-place copies with q,k,v and gate,up
              fused), then drops the engine's encoder and prefix caches.
  abort or a failed collective: the learner publishes v to the WeightStore first, every receiver
              loads v from there, and the driver re-forms the group before the next sync.

Restarts: a crashed rollout actor that Ray restarts must hold the newest weights before it redoes
its call, and NCCL communicators have a fixed membership, so a new process cannot join the live
group. So the learner keeps publishing every version to the WeightStore (object store; for this
reason only, and in the learner's own dtype); the restarted actor loads it in its constructor,
answers "out" to the next broadcast, and the group is re-formed with it at the sync after.
"""
from __future__ import annotations

import datetime
import pickle
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

# The receiving end of the group in this process (a vLLM worker, or an HF rollout actor).
_RECEIVER: Optional["Channel"] = None


@dataclass(frozen=True)
class GroupSpec:
    """Everything a rank needs to join one weight-sync group (sent as a plain dict)."""
    name: str            # unique per formation: store keys and the group's identity
    host: str            # learner rank 0's node (TCPStore master)
    port: int
    world: int           # 1 + all receiving ranks
    backend: str         # "gloo" (CPU) or "nccl" (GPU)
    timeout_s: float

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)


def _spec(spec: GroupSpec | dict) -> GroupSpec:
    return spec if isinstance(spec, GroupSpec) else GroupSpec(**spec)


def _store(spec: GroupSpec, base: Optional[dist.Store] = None) -> dist.Store:
    """The group's key space: a client of the learner's TCPStore (or the master itself)."""
    if base is None:
        base = dist.TCPStore(spec.host, spec.port, None, False, spec.timeout, wait_for_workers=False)
    return dist.PrefixStore(spec.name + "/", base)


def _process_group(store: dist.Store, rank: int, spec: GroupSpec):
    """Standalone gloo / NCCL group (constructors torch 2.11 and 2.13 share); blocks until all join."""
    pg_store = dist.PrefixStore("pg/", store)
    if spec.backend == "gloo":
        return dist.ProcessGroupGloo(pg_store, rank, spec.world, spec.timeout)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = spec.timeout
    return dist.ProcessGroupNCCL(pg_store, rank, spec.world, opts)


class Channel:
    """One rank's membership: the store keys and the process group."""

    def __init__(self, spec: GroupSpec, rank: int, store: dist.Store, pg=None):
        self.spec, self.rank, self.store, self.pg = spec, rank, store, pg

    @classmethod
    def join(cls, spec: GroupSpec, rank: int, base_store: Optional[dist.Store] = None) -> "Channel":
        store = _store(spec, base_store)
        return cls(spec, rank, store, _process_group(store, rank, spec))

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
            except Exception:  # gloo has no shutdown on some versions; dropping it closes the pairs
                pass


# ----------------------------------------------------------------------------- learner side


def bucket_plan(params: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[dict]:
    """Consecutive parameters of one dtype packed into flat buckets of at most `bucket_bytes`."""
    buckets: list[dict] = []
    size = 0
    for name, p in params:
        shape = tuple(p.ds_shape if hasattr(p, "ds_shape") else p.shape)  # ZeRO-3: the full shape
        dtype = str(p.dtype).removeprefix("torch.")
        nbytes = p.element_size() * int(torch.Size(shape).numel())
        if not buckets or buckets[-1]["dtype"] != dtype or (size + nbytes > bucket_bytes and buckets[-1]["items"]):
            buckets.append({"dtype": dtype, "items": []})
            size = 0
        buckets[-1]["items"].append((name, shape))
        size += nbytes
    return buckets


class Sender:
    """Learner rank 0's end: hosts the store, waits for the receivers, broadcasts bucket by bucket."""

    def __init__(self, host: str, timeout_s: float):
        # port 0: the OS picks a free port on this node; the driver learns it from `address`
        self.master = dist.TCPStore(host, 0, None, True, datetime.timedelta(seconds=timeout_s),
                                    wait_for_workers=False)
        self.address = (host, self.master.port)
        self.channel: Optional[Channel] = None

    def join(self, spec: GroupSpec | dict) -> bool:
        """Form the group (rank 0). On failure the store stays up and the next sync aborts."""
        spec = _spec(spec)
        store = _store(spec, self.master)
        self.channel = Channel(spec, 0, store)
        try:
            self.channel.pg = _process_group(store, 0, spec)
        except Exception as e:  # a receiver never came: the next sync falls back and re-forms
            print(f"weight sync: group {spec.name} failed to form: {e}", flush=True)
            return False
        return True

    def await_receivers(self, version: int, n_targets: int) -> bool:
        """True when every target answered "in" (and the group is whole)."""
        keys = [f"ready/{version}/{i}" for i in range(n_targets)]
        self.channel.store.wait(keys, self.channel.spec.timeout)
        return self.channel.pg is not None and all(self.channel.store.get(k) == b"in" for k in keys)


def send_weights(module: torch.nn.Module, version: int, *, sender: Optional[Sender], n_targets: int,
                 zero3: bool, bucket_bytes: int, publish: Optional[Callable[[dict], None]]) -> dict:
    """Broadcast `module`'s parameters as `version` (every learner rank calls this under ZeRO-3:
    the gathers are collective; only the rank holding `sender` talks to the receivers).

    `publish(state_dict)` (rank 0, optional) hands a host copy to the WeightStore: before "abort"
    is announced when the broadcast cannot run, after the broadcast otherwise.
    """
    t0 = time.perf_counter()
    params = [(n, p) for n, p in module.named_parameters() if n != "lm_head.weight"]
    plan = bucket_plan(params, bucket_bytes)
    go = False
    if sender is not None:
        sender.channel.store.set(f"meta/{version}", pickle.dumps(plan))
        go = sender.await_receivers(version, n_targets)
        if go:
            sender.channel.store.set(f"go/{version}", b"go")
    by_name = dict(params)
    host: dict[str, torch.Tensor] = {}
    sent = 0
    failed = None
    for bucket in plan:
        ps = [by_name[name] for name, _ in bucket["items"]]
        if zero3:
            import deepspeed
            ctx = deepspeed.zero.GatheredParameters(ps, modifier_rank=None)
        else:
            ctx = nullcontext()
        with ctx:
            if sender is None:
                continue
            flat = torch.cat([p.data.reshape(-1) for p in ps])
            if go and failed is None:
                try:
                    sender.channel.broadcast(flat)
                    sent += flat.numel() * flat.element_size()
                except Exception as e:  # a receiver died mid-broadcast: fall back, re-form later
                    failed = e
                    sender.channel.close()
            if publish is not None:
                cpu = flat.to("cpu", copy=True)
                off = 0
                for name, shape in bucket["items"]:
                    n = int(torch.Size(shape).numel())
                    host[name] = cpu[off:off + n].view(shape)
                    off += n
    if sender is None:
        return {"status": "skipped", "version": version}
    if publish is not None:
        publish(host)
    if not go:
        sender.channel.store.set(f"go/{version}", b"abort")
    if failed is not None:
        print(f"weight sync: broadcast of v{version} failed ({failed}); receivers fall back", flush=True)
    ok = go and failed is None
    return {"status": "ok" if ok else "rejoin", "version": version, "bytes": sent,
            "seconds": time.perf_counter() - t0}


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


def _plan_names(plan: list[dict]) -> list[str]:
    return [name for b in plan for name, _ in b["items"]]


def _vllm_model(worker):
    runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
    return runner.model


def _worker_join(worker, spec: dict, base_rank: int) -> int:
    """Inside a vLLM worker process (collective_rpc): join the group as base_rank + its own rank."""
    global _RECEIVER
    if _RECEIVER is not None:
        _RECEIVER.close()
    rank = base_rank + int(getattr(worker, "rank", 0) or 0)
    _RECEIVER = Channel.join(_spec(spec), rank)
    return rank


def _worker_receive(worker, name: str, version: int) -> int:
    """Inside a vLLM worker process (collective_rpc): receive version `version` into the model."""
    from ark_ray.engines.vllm_engine import load_into_worker

    ch = _RECEIVER
    if ch is None or ch.spec.name != name:
        raise RuntimeError(f"this vLLM worker is not in weight-sync group {name}")
    plan = pickle.loads(ch.store.get(f"meta/{version}"))
    device = next(_vllm_model(worker).parameters()).device
    return load_into_worker(worker, _receive_stream(ch, plan, device), _plan_names(plan))


def join_engine(engine, spec: dict, base_rank: int) -> int:
    """Join every process that runs `engine`'s model; returns how many ranks joined."""
    llm = getattr(engine, "llm", None)
    if llm is not None:  # vLLM: the model lives in the worker processes
        return len(llm.collective_rpc(_worker_join, args=(dict(spec), base_rank)))
    global _RECEIVER  # an in-process engine (HFEngine): this actor is the receiver
    if _RECEIVER is not None:
        _RECEIVER.close()
    _RECEIVER = Channel.join(_spec(spec), base_rank)
    return 1


def _receive_into_engine(engine, name: str, version: int) -> None:
    llm = getattr(engine, "llm", None)
    if llm is not None:
        llm.collective_rpc(_worker_receive, args=(name, version))
        engine.reset_caches()
        return
    ch = _RECEIVER
    if ch is None or ch.spec.name != name:
        raise RuntimeError(f"this engine is not in weight-sync group {name}")
    plan = pickle.loads(ch.store.get(f"meta/{version}"))
    device = next(engine.model.parameters()).device
    engine.update_weights(_receive_stream(ch, plan, device))


def receive(engine, spec: dict, index: int, version: int, member: bool) -> bool:
    """One receiver's side of a sync (the RolloutWorker actor calls it). True: `engine` now holds
    `version` from the broadcast; False: it must load `version` from the WeightStore (the sync
    aborted, this actor is not in the group, or the collective failed)."""
    spec = _spec(spec)
    store = _store(spec)
    store.set(f"ready/{version}/{index}", b"in" if member else b"out")
    store.wait([f"go/{version}"], spec.timeout)
    if not member or store.get(f"go/{version}") != b"go":
        return False
    try:
        _receive_into_engine(engine, spec.name, version)
    except Exception as e:  # the learner or a peer failed mid-broadcast
        print(f"weight sync: receiving v{version} failed ({e}); loading it from the WeightStore", flush=True)
        return False
    return True


# ----------------------------------------------------------------------------- driver side


class BroadcastSync:
    """The driver's handle on the group: forms it (again when needed) and starts each sync.

    Nothing here waits for the rollout actors: every call is queued on its actor, so each one
    takes the weights between two of its rollouts, in order.
    """

    def __init__(self, learners: list, backend: str, bucket_mb: float, timeout_s: float,
                 ranks_per_target: int = 1):
        self.learners = learners
        self.backend = backend
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.timeout_s = timeout_s
        self.ranks_per_target = ranks_per_target
        self.spec: Optional[GroupSpec] = None
        self.members: list = []
        self.last = None  # learner rank 0's result of the previous sync
        self.formations = 0

    def _needs_group(self, targets: list) -> bool:
        import ray

        if self.spec is None or [t._actor_id for t in targets] != [t._actor_id for t in self.members]:
            return True
        return self.last is not None and ray.get(self.last)["status"] != "ok"

    def _form(self, targets: list) -> None:
        import ray

        host, port = ray.get(self.learners[0].weight_group_address.remote())
        w = self.ranks_per_target
        self.spec = GroupSpec(name=f"ark-wsync-{uuid.uuid4().hex[:12]}", host=host, port=port,
                              world=1 + w * len(targets), backend=self.backend, timeout_s=self.timeout_s)
        spec = asdict(self.spec)
        self.learners[0].join_weight_group.remote(spec)
        for i, t in enumerate(targets):
            t.join_weight_group.remote(spec, 1 + i * w, w)
        self.members = list(targets)
        self.formations += 1

    def push(self, targets: list, version: int, store=None) -> list:
        """Start the sync of `version`; returns the refs of all calls (learner ranks, then targets)."""
        if self._needs_group(targets):
            self._form(targets)
        spec = asdict(self.spec)
        learner_refs = [w.broadcast_weights.remote(version, len(targets), self.bucket_bytes, store)
                        for w in self.learners]
        self.last = learner_refs[0]
        return learner_refs + [t.receive_weights.remote(spec, i, version) for i, t in enumerate(targets)]


__all__ = ["GroupSpec", "Channel", "Sender", "BroadcastSync", "bucket_plan", "send_weights",
           "join_engine", "receive"]
