"""Collective weight sync: learner rank 0 broadcasts into the engine processes of every RolloutWorker.

Why: the object-store path (`ray.put` of a state dict, each rollout actor reads it and ships it
to its vLLM process) copies the whole model through host memory several times per sync. The
broadcast moves it once, straight into the process that runs the model, the way OpenRLHF and
verl sync vLLM; on GPUs over NCCL, on CPU over gloo. One code path for both, so the CPU tests
run the protocol the GPU box runs.

Group: a standalone process group, `TCPStore` + `ProcessGroupGloo` / `ProcessGroupNCCL`; the
default groups that DeepSpeed (learners) and vLLM (its workers) own are never touched. Learner
rank 0 hosts the store for the whole run and is rank 0 of the group; rollout worker i owns
ranks 1 + i*w ... (w vLLM workers per engine). The receiving side runs inside each vLLM worker
process, sent there with `collective_rpc`.

One sync (version v) is one call per actor (learner ranks: `broadcast_weights`, rollout actors:
`receive_weights`), coordinated through keys of the store:
  learner:    meta/v = the bucket plan (names, dtypes, shapes), before any tensor
  receivers:  ready/v/i = b"in:<group>" (a member of that group) or b"new"
  learner:    once every receiver is ready, go/v = {"action": "go"} when all are members of its
              live group, else {"action": "form", group, world}: everyone builds a new group
              now, with every peer known to be waiting (nobody blocks on a peer that is not
              coming). Then flat buckets are broadcast; each receiver streams them into the
              loader VllmEngine.update_weights uses (reload_weights / in-place copies with
              q,k,v and gate,up fused) and drops the engine's encoder and prefix caches.
  a failed collective (a peer died mid-broadcast; bounded by the collective timeout): the
              learner publishes v to the WeightStore anyway, then sets done/v; the receivers, and
              a restarted actor that arrives late, load v from there; the next sync forms a new
              group.

Restarts: a rollout actor that Ray restarts must hold the newest weights before it redoes its
call, and a communicator's membership is fixed, so a new process cannot slip into the live group.
So the learner also publishes every version to the WeightStore (one host copy per sync, in the
learner's dtype; for restarts only): the restarted actor loads it in its constructor, answers
"new" at the next sync, and that sync forms a new group with it.
"""
from __future__ import annotations

import datetime
import pickle
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional

import ray
import torch
import torch.distributed as dist

# This process's receiving end (a vLLM worker, or an in-process HF rollout engine).
_RECEIVER: Optional["Channel"] = None
_KEEP_VERSIONS = 2  # store keys of older syncs are deleted


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


# ----------------------------------------------------------------------------- the store for restarts


class WeightStore:
    """Holds the newest published weights (an object ref) and their version, by name."""

    def __init__(self):
        self.ref = None
        self.version = 0

    def publish(self, refs: list, version: int) -> None:
        self.ref, self.version = refs[0], version

    def latest(self) -> tuple[Optional[list], int]:
        return ([self.ref] if self.ref is not None else None), self.version



WeightStore = ray.remote(num_cpus=0)(WeightStore)


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

    def begin(self, version: int, plan: list[dict], n_targets: int, ranks_per_target: int) -> bool:
        """Publish the plan, wait for every receiver, then announce go or a new group (and form
        it). False: the group could not be formed; the receivers fall back to the WeightStore."""
        k = self.keys
        k.set(f"meta/{version}", pickle.dumps(plan))
        ready = [f"ready/{version}/{i}" for i in range(n_targets)]
        k.wait(ready, self.spec.timeout)
        answers = [k.get(r) for r in ready]
        world = 1 + n_targets * ranks_per_target
        ch = self.channel
        if ch is not None and ch.pg is not None and ch.world == world and \
                all(a == f"in:{ch.name}".encode() for a in answers):
            k.set(f"go/{version}", pickle.dumps({"action": "go"}))
            return True
        if ch is not None:
            ch.close()
        name = f"g{version}"
        k.set(f"go/{version}", pickle.dumps({"action": "form", "group": name, "world": world}))
        try:
            self.channel = Channel.join(self.spec, k, name, 0, world)
        except Exception as e:  # a receiver died while joining: this sync falls back
            print(f"weight sync: group {name} failed to form: {e}", flush=True)
            self.channel = None
            return False
        self.formations += 1
        return True

    def forget(self, version: int, n_targets: int) -> None:
        """Delete the keys of an old sync (the store lives as long as the run)."""
        for key in [f"meta/{version}", f"go/{version}", f"done/{version}"] + \
                [f"ready/{version}/{i}" for i in range(n_targets)]:
            try:
                self.keys.delete_key(key)
            except Exception:  # absent: nothing to delete
                pass


def send_weights(module: torch.nn.Module, version: int, *, sender: Optional[Sender], n_targets: int,
                 ranks_per_target: int, zero3: bool, bucket_bytes: int,
                 publish: Optional[Callable[[dict], None]]) -> dict:
    """Broadcast `module`'s parameters as `version`. Under ZeRO-3 every learner rank calls this
    (the gathers are collective); only the rank holding `sender` talks to the receivers.

    `publish(state_dict)` (rank 0, optional) hands a host copy to the WeightStore after the
    broadcast, also when the broadcast failed: the receivers then load it from there.
    """
    t0 = time.perf_counter()
    params = [(n, p) for n, p in module.named_parameters() if n != "lm_head.weight"]
    plan = bucket_plan(params, bucket_bytes)
    go, formed_before = False, 0
    if sender is not None:
        formed_before = sender.formations
        go = sender.begin(version, plan, n_targets, ranks_per_target)
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
                except Exception as e:  # a receiver died mid-broadcast: fall back, re-form next time
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
    sender.keys.set(f"done/{version}", b"1")  # late receivers (a restarted actor) fall back now
    if failed is not None:
        print(f"weight sync: broadcast of v{version} failed ({failed}); receivers fall back", flush=True)
    sender.forget(version - _KEEP_VERSIONS, n_targets)
    return {"status": "ok" if go and failed is None else "fallback", "version": version, "bytes": sent,
            "formed": sender.formations > formed_before, "formations": sender.formations,
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
    from ark_ray.engines.vllm_engine import load_into_worker

    ch, plan = _prepare(spec, version, group, base_rank + int(getattr(worker, "rank", 0) or 0))
    runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
    device = next(runner.model.parameters()).device
    names = [name for b in plan for name, _ in b["items"]]
    return load_into_worker(worker, _receive_stream(ch, plan, device), names)


def _receive_into_engine(engine, spec: dict, version: int, group: Optional[dict], base_rank: int,
                         ranks: int) -> None:
    llm = getattr(engine, "llm", None)
    if llm is not None:  # vLLM: the model lives in the worker processes
        done = llm.collective_rpc(_worker_receive, args=(dict(spec), version, group, base_rank))
        if len(done) != ranks:
            raise RuntimeError(f"{len(done)} engine processes took part, the group expects {ranks}")
        engine.reset_caches()
        return
    ch, plan = _prepare(spec, version, group, base_rank)  # an in-process engine (HFEngine)
    engine.update_weights(_receive_stream(ch, plan, next(engine.model.parameters()).device))


def receive(engine, spec: dict, index: int, version: int, group: Optional[str], ranks: int = 1) -> Optional[str]:
    """One rollout actor's side of a sync. `group`: the group its engine is in (None: none).
    Returns the group the engine is in afterwards when `version` arrived by broadcast, else
    raises: the caller then loads `version` from the WeightStore."""
    sp = _spec(spec)
    keys = _keys(sp)
    keys.set(f"ready/{version}/{index}", f"in:{group}".encode() if group else b"new")
    keys.wait([f"go/{version}"], sp.timeout)
    if keys.check([f"done/{version}"]):
        raise RuntimeError(f"the learner finished v{version} without this actor")
    go = pickle.loads(keys.get(f"go/{version}"))
    form = go if go["action"] == "form" else None
    if form is None and group is None:
        raise RuntimeError(f"v{version} went out on a group this actor is not in")
    _receive_into_engine(engine, spec, version, form, 1 + index * ranks, ranks)
    return form["group"] if form else group


# ----------------------------------------------------------------------------- driver side


class BroadcastSync:
    """The driver's handle: learns where the learner's store listens and starts each sync.

    Nothing here waits for the rollout actors: every call is queued on its actor, so each one
    takes the weights between two of its rollouts, in order.
    """

    def __init__(self, learners: list, bucket_mb: float, ranks_per_target: int = 1):
        self.learners = learners
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.ranks_per_target = ranks_per_target
        self.spec: Optional[dict] = None
        self.last = None  # learner rank 0's result of the previous sync

    def push(self, targets: list, version: int, store=None) -> list:
        """Start the sync of `version`; returns the refs of all calls (learner ranks, then targets)."""
        import ray

        if self.last is not None:
            ray.get(self.last)  # a sync that failed outright (timeout) stops the run here
        if self.spec is None:
            self.spec = asdict(ray.get(self.learners[0].weight_sync_store.remote()))
        learner_refs = [w.broadcast_weights.remote(version, len(targets), self.ranks_per_target,
                                                   self.bucket_bytes, store) for w in self.learners]
        self.last = learner_refs[0]
        return learner_refs + [t.receive_weights.remote(self.spec, i, version, self.ranks_per_target)
                               for i, t in enumerate(targets)]


__all__ = ["WeightStore", "StoreSpec", "Channel", "Sender", "BroadcastSync", "bucket_plan", "send_weights", "receive"]
