"""Learner actor group: N Ray actors, one torch.distributed rank each, around a DeepSpeed engine.

Why actors and not Ray Train: the OPD controller drives learners step by step (it hands each step
a trajectory batch from the object store and pulls weights out for the rollout workers), which is
OpenRLHF's `trainer/ray/` pattern. On CPU: gloo, fp32; on GPU: NCCL, bf16 with fp32 master weights
(DeepSpeed's bf16 optimizer), actors in a placement group (one GPU bundle per rank).

Loss normalisation: each rank's loss is (its summed token loss) / (global token count) x world,
so after DeepSpeed's gradient averaging the update equals one big batch on one rank.
"""
from __future__ import annotations

import math
import os
import random
import socket
import sys
from dataclasses import asdict
from typing import Any, Optional

import numpy as np
import ray
import torch

from ark_ray.config import LearnerConfig

TORCH_KEYS = ("input_ids", "attention_mask", "labels", "input_features", "feature_lengths",
              "response_start", "union_ids", "teacher_logprobs", "teacher_tail_logprob", "response_mask")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory comm op (~90 s) on first use.

    Plain gloo collectives are all we need; patch the builder through sys.modules (binding the
    module via `import deepspeed.comm.torch as m` would bind torch itself).
    """
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def lr_lambda(cfg: LearnerConfig, total_steps: int):
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


class LearnerWorker:
    """One rank. Created through `LearnerGroup`; not used directly."""

    def __init__(self, model_dir: str, cfg: dict, total_steps: int, rank: int, world: int,
                 master_addr: str, master_port: int):
        self.cfg = LearnerConfig(**cfg)
        self.rank, self.world = rank, world
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK="0" if not self.cfg.use_gpu else str(rank % max(1, torch.cuda.device_count())),
                          LOCAL_WORLD_SIZE=str(world))
        if not self.cfg.use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        if not self.cfg.use_gpu:
            _skip_deepspeed_shm_build()
        deepspeed.init_distributed(dist_backend="nccl" if self.cfg.use_gpu else "gloo")
        from ark_ray.model import ArkAsrForConditionalGeneration

        self._seed(self.cfg.seed)
        model = ArkAsrForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
        model.config.use_cache = False
        opt = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr, betas=tuple(self.cfg.betas),
                                weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg, total_steps))
        ds_config = {
            "train_micro_batch_size_per_gpu": self.cfg.micro_batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.cfg.grad_clip,
            "zero_optimization": {"stage": self.cfg.zero_stage},
            "bf16": {"enabled": bool(self.cfg.use_gpu)},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
        self.device = self.engine.device
        self.step = 0
        self._sender = None  # rank 0's end of the weight-sync group (weight_sync="broadcast")

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _to_torch(self, shard: dict) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in shard.items():
            if k in TORCH_KEYS:
                t = torch.as_tensor(np.asarray(v))
                if t.is_floating_point() and k == "input_features":
                    t = t.to(self.engine.module.dtype if self.cfg.use_gpu else torch.float32)
                out[k] = t.to(self.device)
        return out

    def _sft_loss(self, b: dict, global_tokens: int) -> tuple[torch.Tensor, dict]:
        out = self.engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                          input_features=b["input_features"], feature_lengths=b["feature_lengths"])
        logits = out.logits[:, :-1].float()
        labels = b["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               ignore_index=-100, reduction="sum")
        n_tok = int((labels != -100).sum())
        loss = ce / max(1, global_tokens) * self.world
        return loss, {"ce_sum": float(ce.detach()), "tokens": n_tok}

    def _opd_loss(self, b: dict, global_tokens: int, tau: float) -> tuple[torch.Tensor, dict]:
        from ark_ray.opd.loss import opd_kl_loss

        out = self.engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                          input_features=b["input_features"], feature_lengths=b["feature_lengths"])
        # logits at position p predict token p + 1: response token j (at start + j) comes from
        # position start + j - 1
        t = b["union_ids"].shape[1]
        pos = b["response_start"][:, None] - 1 + torch.arange(t, device=self.device)[None, :]
        pos = pos.clamp(max=out.logits.shape[1] - 1)
        logits = out.logits.gather(1, pos[..., None].expand(-1, -1, out.logits.shape[-1])).float()
        loss_sum, stats = opd_kl_loss(logits, b["union_ids"], b["teacher_logprobs"].float(),
                                      b["teacher_tail_logprob"].float(), b["response_mask"], tau=tau,
                                      reduction="sum")
        loss = loss_sum / max(1, global_tokens) * self.world
        stats = {k: float(v) for k, v in stats.items()}
        stats["kl_sum"] = float(loss_sum.detach())
        return loss, stats

    def train_step(self, shard: dict, kind: str, global_tokens: int, tau: float = 1.0) -> dict:
        self.engine.train()
        b = self._to_torch(shard)
        loss, stats = (self._sft_loss(b, global_tokens) if kind == "sft"
                       else self._opd_loss(b, global_tokens, tau))
        self.engine.backward(loss)
        self.engine.step()
        self.step += 1
        stats["lr"] = float(self.scheduler.get_last_lr()[0])
        stats["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        return stats

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
        client_state = dict(client_state, step=self.step, rng={
            "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()})
        self.engine.save_checkpoint(path, tag="state", client_state=client_state)

    def load_checkpoint(self, path: str) -> dict:
        _, client = self.engine.load_checkpoint(path, tag="state", load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        rng = client.pop("rng", None)
        if rng:
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
        self.step = int(client.get("step", 0))
        return client

    # ------------------------------------------------------------------ collective weight sync
    def weight_sync_store(self):
        """Rank 0: start (once) the weight-sync store on a free port of this node; its StoreSpec."""
        from ark_ray.train.weight_sync import Sender

        if self._sender is None:
            self._sender = Sender(ray.util.get_node_ip_address(), "nccl" if self.cfg.use_gpu else "gloo",
                                  self.cfg.weight_sync_timeout_s, self.cfg.weight_sync_collective_timeout_s)
        return self._sender.spec

    def broadcast_weights(self, version: int, n_targets: int, ranks_per_target: int, bucket_bytes: int,
                          store=None) -> dict:
        """Broadcast the current weights as `version` (ark_ray.train.weight_sync); under ZeRO-3 every
        rank takes part in the gathers. Rank 0 also publishes them to `store` (a WeightStore)."""
        from ark_ray.train.weight_sync import send_weights

        zero3 = self.cfg.zero_stage == 3
        if self.rank != 0 and not zero3:
            return {"status": "skipped", "version": version}

        def publish(sd: dict) -> None:
            ray.get(store.publish.remote([ray.put(sd)], version))

        return send_weights(self.engine.module, version, sender=self._sender if self.rank == 0 else None,
                            n_targets=n_targets, ranks_per_target=ranks_per_target, zero3=zero3,
                            bucket_bytes=bucket_bytes,
                            publish=publish if (self.rank == 0 and store is not None) else None)

    def ping(self) -> int:
        return self.rank


class LearnerGroup:
    """N learner ranks as Ray actors; the driver's handle for training, export and weight sync."""

    def __init__(self, model_dir: str, cfg: LearnerConfig, total_steps: int):
        self.cfg = cfg
        self.model_dir = model_dir
        world = cfg.num_workers
        opts: dict[str, Any] = {"num_cpus": cfg.num_cpus_per_worker}
        self.pg = None
        if cfg.use_gpu:
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            gpus = cfg.num_gpus_per_worker  # < 1: shares its card with the rollout engine / teacher
            self.pg = placement_group([{"GPU": gpus, "CPU": cfg.num_cpus_per_worker}] * world, strategy="PACK")
            ray.get(self.pg.ready())
            opts["num_gpus"] = gpus
        port = _free_port()
        actor_cls = ray.remote(LearnerWorker)
        self.workers = []
        for r in range(world):
            o = dict(opts)
            if self.pg is not None:
                o["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r)
            env = {"DS_ACCELERATOR": "cpu"} if not cfg.use_gpu else {}
            self.workers.append(actor_cls.options(**o, runtime_env={"env_vars": env}).remote(
                model_dir, asdict(cfg), total_steps, r, world, "127.0.0.1", port))
        ray.get([w.ping.remote() for w in self.workers])
        self._broadcast = None  # weight_sync.BroadcastSync, made on the first broadcast push

    @property
    def world(self) -> int:
        return len(self.workers)

    def train_step(self, batch: dict[str, np.ndarray], kind: str = "sft", tau: float = 1.0) -> dict:
        """One optimizer step on `batch` (split over ranks); returns averaged metrics."""
        if kind == "sft":
            global_tokens = int((np.asarray(batch["labels"])[:, 1:] != -100).sum())
        else:
            global_tokens = int(np.asarray(batch["response_mask"]).sum())
        shards = split_batch(batch, self.world)
        if len(shards) < self.world:  # fewer rows than ranks: repeat so every rank steps
            shards = [shards[i % len(shards)] for i in range(self.world)]
        stats = ray.get([w.train_step.remote(s, kind, global_tokens, tau)
                         for w, s in zip(self.workers, shards)])
        out = {"lr": stats[0]["lr"], "grad_norm": stats[0]["grad_norm"]}
        if kind == "sft":
            out["loss"] = sum(s["ce_sum"] for s in stats) / max(1, global_tokens)
            out["tokens"] = global_tokens
        else:
            out["loss"] = sum(s["kl_sum"] for s in stats) / max(1, global_tokens)
            out["kl"] = out["loss"] / tau ** 2     # the same per-token KL without the tau^2 factor
            for k in ("union_size", "teacher_mass", "student_mass"):
                if k in stats[0]:
                    out[k] = float(np.mean([s[k] for s in stats]))
            out["tokens"] = global_tokens
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        sds = ray.get([w.state_dict.remote() for w in self.workers])
        return sds[0]

    def export_hf(self, out_dir: str, dtype: torch.dtype = torch.bfloat16) -> str:
        """config + model.safetensors (real layout) + tokenizer/processor files in `out_dir`."""
        from ark_ray.model import ArkAsrForConditionalGeneration
        from ark_ray.model.processor import ArkAsrProcessor

        model = ArkAsrForConditionalGeneration.from_pretrained(self.model_dir, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(self.state_dict(), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # only the tied head may be absent
            raise RuntimeError(f"export: missing {missing}, unexpected {unexpected}")
        model.to(dtype).save_pretrained(out_dir)
        ArkAsrProcessor.from_pretrained(self.model_dir).save_pretrained(out_dir)
        return out_dir

    def save_checkpoint(self, path: str, client_state: dict) -> None:
        ray.get([w.save_checkpoint.remote(path, client_state) for w in self.workers])

    def load_checkpoint(self, path: str) -> dict:
        return ray.get([w.load_checkpoint.remote(path) for w in self.workers])[0]

    @property
    def weight_sync(self) -> str:
        """The resolved `weight_sync` mode ("auto": broadcast with whole GPUs, else the object store)."""
        mode = self.cfg.weight_sync
        if mode != "auto":
            return mode
        whole_cards = getattr(self.cfg, "num_gpus_per_worker", 1.0) >= 1  # NCCL: one rank per card
        return "broadcast" if self.cfg.use_gpu and whole_cards else "object_store"

    def push_weights(self, targets: list, version: int, store=None, wait: bool = True) -> list:
        """Hand the current weights, as `version`, to rollout actors (RolloutWorker).

        object_store: one `ray.put` of the state dict; every target loads it (`update_weights`).
        broadcast: learner rank 0 broadcasts into the targets' engine processes (gloo on CPU,
        NCCL on GPU; ark_ray.train.weight_sync), forming the group on first use.
        `store` (a WeightStore) also gets the weights, for rollout actors Ray restarts. With
        wait=False the calls are only queued (each actor applies them before its next call)
        and their refs returned.
        """
        if self.weight_sync == "broadcast":
            if self._broadcast is None:
                from ark_ray.train.weight_sync import BroadcastSync
                self._broadcast = BroadcastSync(self.workers, self.cfg.weight_sync_bucket_mb)
            refs = self._broadcast.push(targets, version, store)
        else:
            ref = ray.put(self.state_dict())
            if store is not None:
                ray.get(store.publish.remote([ref], version))
            refs = [t.update_weights.remote([ref], version) for t in targets]
        if wait:
            ray.get(refs)
        return refs

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self.pg)
