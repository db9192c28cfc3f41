"""The learner rank (a DeepSpeed engine on one torch.distributed rank) and OPD's group of them.

`LearnerWorker` is one rank. OPD runs N of them as Ray actors (`LearnerGroup`): its controller
drives the learners step by step (it hands each step a trajectory batch from the object store and
pulls weights out for the rollout workers), which is OpenRLHF's `trainer/ray/` pattern. SFT runs
the same rank inside Ray Train workers (`ark_ray/train/sft_loop.py`: each reads its own dataset
shard, `train_shard`). On CPU: gloo, fp32; on GPU: NCCL, bf16 compute with fp32 master
weights and optimizer state (`deepspeed_config` says which DeepSpeed wrapper keeps them); OPD's actors in
one placement group (one bundle per rank). `learner.gradient_checkpointing` recomputes every decoder
and encoder layer in the backward pass.

The loss comes from the job (`ark_ray.train.losses.Loss`: SFT's TokenCrossEntropy by default, OPD's
`ark_ray.opd.loss.OpdLoss`). Normalisation: each micro-batch's loss is (its summed token loss) /
(the batch's global token count) x world, so after DeepSpeed's gradient averaging the update equals
one big batch on one rank, whatever the number of ranks and micro-batches (`micro_batch_size`).
"""
from __future__ import annotations

import math
import os
import random
import re
import resource
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Optional

import numpy as np
import ray
import torch

from ark_ray.config import LearnerConfig
from ark_ray.data.run_storage import RunStorage
from ark_ray.net import free_port
from ark_ray.train.checkpoints import TAG
from ark_ray.train.losses import Loss, TokenCrossEntropy


#: DeepSpeed's per-rank ZeRO files (`zero_pp_rank_<r>_mp_rank_00_optim_states.pt`, ZeRO-3's
#: `..._model_states.pt`): a resuming rank downloads only its own
_RANK_SHARD = re.compile(r"(?:^|/)zero_pp_rank_(\d+)_")


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory comm op (~90 s) on first use.

    Plain gloo collectives are all we need; patch the builder through sys.modules (binding the
    module via `import deepspeed.comm.torch as m` would bind torch itself).
    """
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def lr_lambda(cfg: LearnerConfig, total_steps: int):
    """LR factor per optimizer step (linear warm-up, then cosine to min_lr_ratio over `total_steps`)."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def split_batch(batch: dict[str, np.ndarray], world: int) -> list[dict[str, np.ndarray]]:
    """Rows r, r + world, ... go to rank r (every rank gets at least one row when possible)."""
    n = len(next(iter(batch.values())))
    return [{k: v[r::world] for k, v in batch.items()} for r in range(world) if r < n] or [batch]


def micro_parts(n_rows: int, n_micro: int) -> list[np.ndarray]:
    """Row indices of `n_micro` near-equal contiguous micro-batches (empty ones when n_rows < n_micro)."""
    return np.array_split(np.arange(n_rows), n_micro)


def deepspeed_config(cfg: LearnerConfig) -> dict:
    """The DeepSpeed config for `cfg`.

    Precision on GPU (bf16 on; read from DeepSpeed 0.19.8's engine): the module runs in bf16 and the
    optimizer wrapper keeps fp32 master weights with the AdamW state on them: ZeRO 2 ->
    DeepSpeedZeroOptimizer (fp32 `single_partition_of_fp32_groups`), ZeRO 3 ->
    DeepSpeedZeroOptimizer_Stage3 (fp32 `fp32_partitioned_groups_flat`), ZeRO 1 with fp32 gradient
    accumulation -> BF16_Optimizer (fp32 `fp32_groups_flat_partition`), ZeRO 0 -> FP16_UnfusedOptimizer
    in bf16 mode (fp32 `fp32_groups`). For ZeRO 1-3 `data_types.grad_accum_dtype=fp32` makes the
    gradients of the micro-batches add up in fp32; ZeRO 0 refuses that mix (bf16 accumulation).
    On CPU everything is fp32.

    Accumulation: the learner sets the boundary itself (`set_gradient_accumulation_boundary`, the last
    micro-batch of every grad_accum_steps-th batch) and calls `backward(loss, scale_wrt_gas=False)`,
    having already divided each loss by the global token count and by grad_accum_steps; so
    DeepSpeed's own micro-step counter and 1/gradient_accumulation_steps loss scaling are not used,
    and the number of micro-batches may change from batch to batch. `gradient_accumulation_steps`
    and `train_micro_batch_size_per_gpu` are set to the nominal values (DeepSpeed's sample counters).
    """
    bf16 = bool(cfg.use_gpu)
    out = {
        "train_micro_batch_size_per_gpu": max(1, cfg.micro_batch_size),
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16 and cfg.zero_stage >= 1:
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    return out


def _peak_mem_gb(use_gpu: bool) -> float:
    """This step's peak allocated GPU memory (torch allocator); on CPU the process's max RSS so far."""
    if use_gpu:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux: KiB


def summarize_step(loss: Loss, stats: list[dict], global_tokens: int, n_micro: int) -> dict:
    """A learner step's metrics from every rank's `train_step` result: the loss's metrics over the
    summed stats, rank 0's lr / grad_norm / optimizer_step, the largest peak memory and the
    slowest rank's time in each phase."""
    sums: dict[str, float] = {}
    for s in stats:
        for k, v in s["sums"].items():
            sums[k] = sums.get(k, 0.0) + v
    out = dict(loss.summarize(sums, global_tokens))
    out.update(lr=stats[0]["lr"], grad_norm=stats[0]["grad_norm"], optimizer_step=stats[0]["optimizer_step"],
               micro_batches=n_micro, peak_mem_gb=round(max(s["peak_mem_gb"] for s in stats), 3),
               **{k: round(max(s[k] for s in stats), 4) for k in ("forward_s", "backward_s", "optimizer_s")})
    return out


def export_hf(model_dir: str, state_dict: dict[str, torch.Tensor], out_dir: str,
              dtype: torch.dtype = torch.bfloat16) -> str:
    """config + model.safetensors (real layout) + tokenizer/processor files in `out_dir`: the
    model of `model_dir` with the learner's weights `state_dict` (`LearnerWorker.state_dict`)."""
    from ark_ray.model import ArkAsrForConditionalGeneration
    from ark_ray.model.processor import ArkAsrProcessor

    model = ArkAsrForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # only the tied head may be absent
        raise RuntimeError(f"export: missing {missing}, unexpected {unexpected}")
    model.to(dtype).save_pretrained(out_dir)
    ArkAsrProcessor.from_pretrained(model_dir).save_pretrained(out_dir)
    return out_dir


class LearnerWorker:
    """One rank: a Ray actor of `LearnerGroup` (OPD), or the object a Ray Train worker of SFT builds
    in its training loop (`ark_ray/train/sft_loop.py`).

    `master_addr` None: the torch.distributed process group already exists (Ray Train's
    TorchConfig made it, and set RANK / LOCAL_RANK / WORLD_SIZE); `rank` and `world` are then
    read from it and DeepSpeed joins it."""

    def __init__(self, model_dir: str, cfg: dict, total_steps: int, rank: int = 0, world: int = 1,
                 master_addr: Optional[str] = None, master_port: int = 0, loss: Optional[Loss] = None):
        self.cfg = LearnerConfig(**cfg)
        self.loss = loss if loss is not None else TokenCrossEntropy()
        if master_addr is None:
            import torch.distributed as dist

            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank), WORLD_SIZE=str(world),
                              LOCAL_RANK="0" if not self.cfg.use_gpu else str(rank % max(1, torch.cuda.device_count())),
                              LOCAL_WORLD_SIZE=str(world))
        self.rank, self.world = rank, world
        if not self.cfg.use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        if not self.cfg.use_gpu:
            _skip_deepspeed_shm_build()
        deepspeed.init_distributed(dist_backend="nccl" if self.cfg.use_gpu else "gloo")
        from ark_ray.model import ArkAsrForConditionalGeneration

        self._seed(self.cfg.seed)
        # loaded in fp32: the optimizer wrapper's master copies start from these; DeepSpeed casts the
        # module itself to bf16 on GPU (deepspeed_config)
        model = ArkAsrForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
        model.config.use_cache = False
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr, betas=tuple(self.cfg.betas),
                                weight_decay=self.cfg.weight_decay)
        optimizer_steps = -(-total_steps // self.cfg.grad_accum_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg, optimizer_steps))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(self.cfg))
        self.device = self.engine.device
        self.step = 0   # learner steps (batches) taken; an optimizer step ends every grad_accum_steps-th
        self._sender = None  # rank 0's end of the weight-sync group (weight_sync="broadcast")
        self._exports: dict[tuple, list] = {}  # (mode, version) -> GPU buckets / object refs handed out

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _to_torch(self, shard: dict, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows `rows` of the numeric columns, on this rank's device; trailing columns that are
        padding in every row are cut (exact: the decoder is causal and no loss reads them)."""
        out = {}
        for k, v in shard.items():
            v = np.asarray(v)
            if v.dtype.kind not in "biuf":
                continue
            t = torch.as_tensor(v[rows])
            if k == "input_features":
                t = t.to(self.engine.module.dtype if self.cfg.use_gpu else torch.float32)
            out[k] = t
        if "attention_mask" in out:
            used = out["attention_mask"].any(0).nonzero()
            width = int(used[-1]) + 1 if len(used) else 1
            for k in ("input_ids", "attention_mask", "labels"):
                if k in out:
                    out[k] = out[k][:, :width]
        return {k: t.to(self.device) for k, t in out.items()}

    def _sync(self) -> float:
        if self.cfg.use_gpu:
            torch.cuda.synchronize()
        return time.perf_counter()

    def train_step(self, shard: dict, n_micro: int, global_tokens: int, weight: float = 1.0) -> dict:
        """Forward/backward on `shard` in `n_micro` micro-batches (gradients add up), then, on every
        grad_accum_steps-th call, one optimizer step.

        Each micro-batch's loss is loss.__call__'s token sum x world / (global_tokens x
        grad_accum_steps): after DeepSpeed averages gradients over ranks, the update equals one
        step on the whole batch on one rank. `weight` 0 (or an empty micro-batch, run on row 0)
        contributes nothing but keeps this rank in step with the others' collectives.
        Returns the loss's summed stats and this rank's lr, grad_norm, peak memory and timings.
        """
        self.engine.train()
        if self.cfg.use_gpu:
            torch.cuda.reset_peak_memory_stats()
        n_rows = len(next(iter(shard.values())))
        boundary = (self.step + 1) % self.cfg.grad_accum_steps == 0
        scale = self.world / (max(1, global_tokens) * self.cfg.grad_accum_steps)
        sums: dict[str, float] = {}
        fwd = bwd = opt_s = 0.0
        parts = micro_parts(n_rows, n_micro)
        for i, rows in enumerate(parts):
            w = weight if len(rows) else 0.0
            self.engine.set_gradient_accumulation_boundary(boundary and i == len(parts) - 1)
            t0 = self._sync()
            loss_sum, stats = self.loss(self.engine, self._to_torch(shard, rows if len(rows) else np.arange(1)))
            t1 = self._sync()
            self.engine.backward(loss_sum * (scale * w), scale_wrt_gas=False)
            t2 = self._sync()
            self.engine.step()   # the optimizer steps only at the boundary
            t3 = self._sync()
            fwd, bwd, opt_s = fwd + t1 - t0, bwd + t2 - t1, opt_s + t3 - t2
            if w:
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        self.step += 1
        return {"sums": sums, "optimizer_step": boundary,
                "lr": float(self.scheduler.get_last_lr()[0]),
                "grad_norm": float(self.engine.get_global_grad_norm() or 0.0) if boundary else None,
                "peak_mem_gb": _peak_mem_gb(self.cfg.use_gpu),
                "forward_s": fwd, "backward_s": bwd, "optimizer_s": opt_s}

    def train_shard(self, shard: dict, weight: float = 1.0) -> dict:
        """One learner step when every rank holds its own shard of the batch (a Ray Train worker
        reading its dataset shard); the same update and metrics as `LearnerGroup.train_step` on
        the whole batch. The ranks agree on the batch's token count and micro-batch count through
        two small all-reduces, and gather each other's loss sums, timings and memory afterwards.
        `weight` 0: this rank has no usable row this step (its shard is a stand-in row) and only
        keeps in step with the others' collectives. Every rank returns the step's metrics."""
        import torch.distributed as dist

        n_rows = len(next(iter(shard.values())))
        counts = torch.tensor([self.loss.tokens(shard) if weight else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(counts)
        most = torch.tensor([n_rows if weight else 1], dtype=torch.int64, device=self.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        global_tokens, most = int(counts.item()), int(most.item())
        n_micro = -(-most // (self.cfg.micro_batch_size or most))
        mine = self.train_step(shard, n_micro, global_tokens, weight)
        stats: list = [None] * self.world
        dist.all_gather_object(stats, mine)
        return summarize_step(self.loss, stats, global_tokens, n_micro)

    def state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """Full weights in the real checkpoint layout (rank 0; gathered under ZeRO-3)."""
        if self.cfg.zero_stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            sd = self.engine.module.state_dict()
        if self.rank != 0 or sd is None:
            return None
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()
                if k != "lm_head.weight"}

    def save_checkpoint(self, path: str, client_state: dict) -> None:
        """This rank's part of a checkpoint into the local folder `path` (DeepSpeed's files under
        `path/deepspeed/`; every rank must call it, each with a folder of its own node)."""
        client_state = dict(client_state, step=self.step, rng={
            "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()})
        self.engine.save_checkpoint(path, tag=TAG, client_state=client_state, save_latest=False)

    def load_checkpoint(self, path: str) -> dict:
        """Load a checkpoint from the local folder `path` (this rank's ZeRO shards and the shared
        files are enough); the job's client state."""
        loaded, client = self.engine.load_checkpoint(path, tag=TAG, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {path}")
        rng = client.pop("rng", None)
        if rng:
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
        self.step = int(client.get("step", 0))
        return client

    def upload_checkpoint(self, storage: RunStorage, rel: str, client_state: dict) -> dict:
        """This rank's part of a checkpoint, staged in a temp folder on this node (TMPDIR), uploaded
        to `rel` in the run folder and deleted (ark_ray.train.checkpoints). What it uploaded:
        rank, node, files, bytes, seconds."""
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"ark-ckpt-rank{self.rank}-") as tmp:
            self.save_checkpoint(tmp, client_state)
            files = storage.upload_dir(tmp, rel)
            size = sum(os.path.getsize(os.path.join(tmp, f)) for f in files)
        return {"rank": self.rank, "node": ray.get_runtime_context().get_node_id(), "files": files,
                "bytes": size, "seconds": time.perf_counter() - t0}

    def download_checkpoint(self, storage: RunStorage, rel: str) -> dict:
        """Fetch `rel` from the run folder into a temp folder on this node (this rank's ZeRO shards
        and the shared files, not the other ranks' shards), load it, delete the folder."""
        def mine(name: str) -> bool:
            m = _RANK_SHARD.search(name)
            return m is None or int(m.group(1)) == self.rank

        with tempfile.TemporaryDirectory(prefix=f"ark-resume-rank{self.rank}-") as tmp:
            if not storage.download_dir(rel, tmp, keep=mine):
                raise FileNotFoundError(f"no checkpoint files at {storage.uri_of(rel)}")
            return self.load_checkpoint(tmp)

    # ------------------------------------------------------------------ weight sync (ark_ray.train.weight_sync)
    def placement(self) -> dict:
        from ark_ray.train.weight_sync import placement
        return placement()

    def _plan(self, dtype: str, bucket_bytes: int) -> list[dict]:
        from ark_ray.train.weight_sync import bucket_plan, sync_params
        return bucket_plan(sync_params(self.engine.module), bucket_bytes, getattr(torch, dtype))

    def export_weights(self, mode: str, version: int, dtype: str, bucket_bytes: int) -> dict:
        """The current weights as `version`, in `dtype` buckets, for `mode` "ipc" (flat GPU buckets
        kept here, with CUDA IPC handles) or "object_store" (one object per bucket). Under ZeRO-3 every
        rank takes part in the gathers; rank 0 answers. Kept until `release_weights(version)`."""
        from ark_ray.engines.weight_buckets import share_cuda
        from ark_ray.train.weight_sync import flat_buckets, put_buckets

        t0 = time.perf_counter()
        zero3 = self.cfg.zero_stage == 3
        if self.rank != 0 and not zero3:
            return {"status": "skipped", "version": version}
        plan = self._plan(dtype, bucket_bytes)
        build = self.rank == 0
        out: dict = {"status": "ok" if build else "skipped", "version": version}
        if mode == "ipc":
            kept, payload = [], []
            for bucket, flat in flat_buckets(self.engine.module, plan, zero3=zero3, build=build):
                if flat is not None:
                    kept.append(flat)
                    payload.append(dict(bucket, handle=share_cuda(flat)))
            if build:
                torch.cuda.synchronize()   # the copies are done before another process reads them
            self._exports[(mode, version)] = kept
            out["payload"] = payload
        elif mode == "object_store":
            refs = put_buckets(self.engine.module, plan, zero3=zero3, build=build)
            self._exports[(mode, version)] = refs
            out["refs"] = refs
        else:
            raise ValueError(f"unknown export mode {mode!r}")
        out["bytes"] = sum(int(torch.Size(s).numel()) for b in plan for _, s in b["items"]) * \
            torch.empty((), dtype=getattr(torch, dtype)).element_size()
        out["bucket_bytes"] = bucket_bytes
        out["seconds"] = time.perf_counter() - t0
        return out

    def release_weights(self, version: int) -> None:
        """Drop what `export_weights(version)` kept (GPU buckets, object refs) and anything older."""
        for key in [k for k in self._exports if k[1] <= version]:
            del self._exports[key]

    def weight_sync_store(self):
        """Rank 0: start (once) the broadcast store on a free port of this node; its StoreSpec."""
        from ark_ray.train.weight_broadcast import Sender

        if self._sender is None:
            self._sender = Sender(ray.util.get_node_ip_address(), "nccl" if self.cfg.use_gpu else "gloo",
                                  self.cfg.weight_sync_timeout_s, self.cfg.weight_sync_collective_timeout_s)
        return self._sender.spec

    def broadcast_weights(self, version: int, n_targets: int, ranks_per_target: int, dtype: str,
                          bucket_bytes: int) -> dict:
        """Broadcast the current weights as `version` in `dtype` buckets (ark_ray.train.weight_broadcast);
        under ZeRO-3 every rank takes part in the gathers."""
        from ark_ray.train.weight_broadcast import send_weights

        zero3 = self.cfg.zero_stage == 3
        if self.rank != 0 and not zero3:
            return {"status": "skipped", "version": version}
        return send_weights(self.engine.module, self._plan(dtype, bucket_bytes), version,
                            sender=self._sender if self.rank == 0 else None, n_targets=n_targets,
                            ranks_per_target=ranks_per_target, zero3=zero3)

    def weight_digests(self, names: list[str], dtype: str) -> dict:
        """{name: (sha1 of the parameter cast to `dtype`, its shape)} (rank 0, no ZeRO-3): what an
        engine holding these weights must report (bench/gpu_check.py)."""
        from ark_ray.engines.vllm_engine import tensor_digest
        from ark_ray.train.weight_sync import sync_params

        params = dict(sync_params(self.engine.module))
        return {n: (tensor_digest(params[n].data.to(getattr(torch, dtype))), tuple(params[n].shape)) for n in names}

    def ping(self) -> int:
        return self.rank


def pack_strategy(bundles: list[dict], nodes: list[dict]) -> str:
    """STRICT_PACK when one live node has room for every bundle of the group (all ranks on one host:
    intra-node NCCL, one rendezvous address), else PACK (as few nodes as Ray can manage).

    `nodes`: each live node's total resources (`ray.nodes()[i]["Resources"]`)."""
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    fits = any(all(n.get(k, 0.0) >= v for k, v in need.items()) for n in nodes)
    return "STRICT_PACK" if fits else "PACK"


@ray.remote(num_cpus=0)
def _rendezvous() -> tuple[str, int]:
    """Run in rank 0's bundle: the address and a free port of the node rank 0 will run on."""
    return ray.util.get_node_ip_address(), free_port()


class LearnerGroup:
    """N learner ranks as Ray actors in one placement group; the driver's handle for training, export
    and weight sync.

    Placement: one bundle per rank ({CPU: num_cpus, GPU: num_gpus when use_gpu, custom `resources`}), STRICT_PACK where
    one node has room for the whole group, else PACK (`pack_strategy`); the torch.distributed
    rendezvous is on rank 0's node. Faults: a rank lost with its node surfaces as `LearnerLost`
    (naming the rank and its node) from every call into the group, never as a raw Ray error, so the
    job can restart the group from its last checkpoint; an error raised by a rank's own code travels
    as it is.
    """

    def __init__(self, model_dir: str, cfg: LearnerConfig, total_steps: int, loss: Optional[Loss] = None,
                 ready_timeout_s: Optional[float] = None):
        """`loss`: the job's loss object (default SFT cross-entropy); `total_steps`: learner steps
        (batches) of the run, for the LR schedule; `ready_timeout_s`: longest wait for the cluster to
        have room for the group and for its ranks to start (None: no limit); past it, `GetTimeoutError`."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.cfg = cfg
        self.loss = loss if loss is not None else TokenCrossEntropy()
        self.model_dir = model_dir
        world = cfg.num_workers
        bundle = self.bundle(cfg)
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        self.strategy = pack_strategy([bundle] * world, nodes)
        self.pg = placement_group([bundle] * world, strategy=self.strategy)
        self.workers: list = []
        self.nodes: list[Optional[str]] = [None] * world   # each rank's node id (for LearnerLost)
        self._syncs: dict = {}  # target list -> WeightSync
        try:
            ray.get(self.pg.ready(), timeout=ready_timeout_s)
            in_bundle = [PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r)
                         for r in range(world)]
            addr, port = ray.get(_rendezvous.options(scheduling_strategy=in_bundle[0]).remote(),
                                 timeout=ready_timeout_s)
            actor_cls = ray.remote(LearnerWorker)
            env = {"DS_ACCELERATOR": "cpu"} if not cfg.use_gpu else {}
            for r in range(world):
                self.workers.append(actor_cls.options(
                    num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus if cfg.use_gpu else 0,
                    resources=dict(cfg.resources), scheduling_strategy=in_bundle[r], runtime_env={"env_vars": env},
                ).remote(model_dir, asdict(cfg), total_steps, r, world, addr, port, self.loss))
            where = self._gather([w.placement.remote() for w in self.workers], timeout_s=ready_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self.nodes = [p["node"] for p in where]

    @staticmethod
    def bundle(cfg: LearnerConfig) -> dict:
        """What each rank asks Ray for: its placement bundle."""
        return {"CPU": cfg.num_cpus, **({"GPU": cfg.num_gpus} if cfg.use_gpu else {}), **cfg.resources}

    def _gather(self, refs: list, timeout_s: Optional[float] = None) -> list:
        """Every rank's result of one call; a rank lost with its node raises `LearnerLost` (even when
        another rank's error, e.g. its collective failing, arrives first), a rank's own error raises
        as it is."""
        from ark_ray.faults import LearnerLost, is_lost

        out, lost, failed = [], None, None
        for r, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=timeout_s))
            except ray.exceptions.GetTimeoutError:
                raise
            except Exception as e:  # noqa: BLE001 - sorted into lost / the rank's own error below
                out.append(None)
                if is_lost(e) and lost is None:
                    lost = (r, e)
                elif failed is None:
                    failed = e
        if lost is not None:
            r, e = lost
            raise LearnerLost(r, self.nodes[r], e) from e
        if failed is not None:
            raise failed
        return out

    @property
    def world(self) -> int:
        return len(self.workers)

    def train_step(self, batch: dict[str, np.ndarray]) -> dict:
        """One learner step on `batch`: split over the ranks, each shard into micro-batches of at most
        `micro_batch_size` rows, gradients accumulated; the optimizer steps on every
        grad_accum_steps-th call (`optimizer_step` in the result).

        Returns the loss's metrics (`loss` per token, `tokens`, ...) and lr, grad_norm (None between
        optimizer steps), micro_batches (per rank), peak_mem_gb (the largest rank's: torch's peak
        allocation on GPU during this step, max RSS on CPU), forward_s/backward_s/optimizer_s (the
        slowest rank's time in each phase).
        """
        n = len(next(iter(batch.values())))
        if n == 0:
            raise ValueError("train_step: empty batch")
        global_tokens = self.loss.tokens(batch)
        shards = split_batch(batch, self.world)
        weights = [1.0] * len(shards)
        if len(shards) < self.world:  # fewer rows than ranks: the rest run row 0 with weight 0
            stand_in = {k: v[:1] for k, v in batch.items()}
            shards += [stand_in] * (self.world - len(shards))
            weights += [0.0] * (self.world - len(weights))
        most = max(len(next(iter(s.values()))) for s in shards)
        n_micro = -(-most // (self.cfg.micro_batch_size or most))
        stats = self._gather([w.train_step.remote(s, n_micro, global_tokens, wt)
                              for w, s, wt in zip(self.workers, shards, weights)])
        return summarize_step(self.loss, stats, global_tokens, n_micro)

    def state_dict(self) -> dict[str, torch.Tensor]:
        sds = self._gather([w.state_dict.remote() for w in self.workers])
        return sds[0]

    def export_hf(self, out_dir: str, dtype: torch.dtype = torch.bfloat16) -> str:
        """config + model.safetensors (real layout) + tokenizer/processor files in `out_dir`."""
        return export_hf(self.model_dir, self.state_dict(), out_dir, dtype)

    def save_checkpoint(self, storage: RunStorage, rel: str, client_state: dict) -> list[dict]:
        """Every rank writes and uploads its own files to `rel` in the run folder (see
        LearnerWorker.upload_checkpoint); one record per rank. A rank's failure raises here (a
        rank lost with its node: LearnerLost)."""
        return self._gather([w.upload_checkpoint.remote(storage, rel, client_state) for w in self.workers])

    def load_checkpoint(self, storage: RunStorage, rel: str) -> dict:
        """Every rank downloads and loads `rel` on its own node; rank 0's client state."""
        return self._gather([w.download_checkpoint.remote(storage, rel) for w in self.workers])[0]

    def weight_sync(self, targets: list):
        """The `WeightSync` that pushes this group's weights to `targets` (rollout actors), made once
        per target list; `learner.weight_sync` picks the path (ark_ray.train.weight_sync)."""
        from ark_ray.train.weight_sync import WeightSync

        key = tuple(id(t) for t in targets)
        if key not in self._syncs:
            self._syncs[key] = WeightSync(self.workers, self.cfg, targets, learner_nodes=self.nodes)
        return self._syncs[key]

    def push_weights(self, targets: list, version: int) -> dict:
        """Push the current weights as `version` to `targets` and wait until every one reports it;
        the sync's record (paths, seconds, bytes). Raises the receiving actor's error on failure."""
        ws = self.weight_sync(targets)
        ws.push(version)
        return ws.wait()

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001 - a rank already gone with its node
                pass
        self.workers = []
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self.pg)
            self.pg = None                   # shutdown twice is harmless
