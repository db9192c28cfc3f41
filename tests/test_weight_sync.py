"""Collective weight broadcast (gloo on CPU) from a DeepSpeed learner into vLLM rollout engines.

After a learner step and a broadcast sync, the vLLM engine inside a RolloutWorker decodes exactly
like an HF model holding the learner's new weights; the group outlives one sync; a rollout actor
that Ray restarts takes the newest weights from the WeightStore and the next sync forms a new
group with it; an OPD run with `weight_sync=broadcast` finishes.
"""
import uuid

import numpy as np
import pytest
import ray
import torch

pytest.importorskip("vllm")

from ark_ray.config import EngineConfig, LearnerConfig, SamplingConfig  # noqa: E402
from ark_ray.engines import make_engine  # noqa: E402
from ark_ray.model import ArkAsrForConditionalGeneration  # noqa: E402
from ark_ray.model.factory import save_random_model  # noqa: E402
from ark_ray.model.processor import ArkAsrProcessor  # noqa: E402
from ark_ray.train.learner import LearnerGroup  # noqa: E402
from ark_ray.opd.rollout import RolloutWorker
from ark_ray.train.weight_sync import WeightStore  # noqa: E402
from ark_ray.train.weight_sync import bucket_plan  # noqa: E402

SP = SamplingConfig(max_new_tokens=8, logprobs_topk=4)
ENGINE = {"backend": "vllm", "max_num_seqs": 8, "max_model_len": 256}


def probed_rollout_cls():
    """A RolloutWorker that also returns full transcripts (ids and top-k log-probs) for comparison
    (made in a function so Ray ships the class by value)."""

    class ProbedRollout(RolloutWorker):
        def transcripts(self, waves, sampling):
            return self.engine.transcribe(waves, sampling)

    return ProbedRollout


def clips():
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in (1.0, 2.3, 0.4)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("wsync_model")
    save_random_model(d, "tiny", initializer_range=0.2, seed=1)
    return str(d)


@pytest.fixture(scope="module")
def batch(model_dir):
    proc = ArkAsrProcessor.from_pretrained(model_dir)
    rng = np.random.default_rng(1)
    waves = [(0.1 * rng.standard_normal(8000)).astype(np.float32) for _ in range(4)]
    b = proc(waves, texts=["call alice", "play music", "move left", "open door"], padding_side="right")
    return {k: v.numpy() for k, v in b.items()}


def hf_reference(model_dir, state_dict):
    """HF engine holding `state_dict`: what the vLLM engine must now produce (one extra top-k
    rank, to tell ties at the last rank)."""
    eng = make_engine(model_dir, EngineConfig(backend="hf"))
    eng.update_weights(state_dict)
    return eng.transcribe(clips(), SamplingConfig(max_new_tokens=SP.max_new_tokens, logprobs_topk=SP.logprobs_topk + 1))


def assert_same(a, b, atol=1e-3):
    """Same greedy ids and top-k log-probs; a top-k id may differ only where HF's log-probs at
    that rank and a neighbouring one tie within `atol` (the order of a tie is arbitrary)."""
    k = SP.logprobs_topk
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        lp = y.topk_logprobs
        np.testing.assert_allclose(x.topk_logprobs, lp[:, :k], atol=atol)
        gap = np.abs(np.diff(lp, axis=1)) < atol
        tied = np.zeros_like(lp, dtype=bool)
        tied[:, :-1] |= gap
        tied[:, 1:] |= gap
        differs = x.topk_ids != y.topk_ids[:, :k]
        assert not (differs & ~tied[:, :k]).any(), (x.topk_ids, y.topk_ids, x.topk_logprobs, lp)


def test_bucket_plan_packs_by_dtype_and_size():
    ps = [("a", torch.zeros(10)), ("b", torch.zeros(10)), ("c", torch.zeros(30)),
          ("d", torch.zeros(4, dtype=torch.bfloat16)), ("e", torch.zeros(2))]
    plan = bucket_plan(ps, bucket_bytes=100)
    assert [[n for n, _ in b["items"]] for b in plan] == [["a", "b"], ["c"], ["d"], ["e"]]
    assert [b["dtype"] for b in plan] == ["float32", "float32", "bfloat16", "float32"]
    assert plan[1]["items"][0] == ("c", (30,))


def test_broadcast_matches_hf_with_learner_weights_and_survives_restart(ray_local, model_dir, batch):
    cfg = LearnerConfig(lr=2e-2, seed=0, weight_sync="broadcast", weight_sync_bucket_mb=0.5,
                        weight_sync_timeout_s=300, weight_sync_collective_timeout_s=60)
    group = LearnerGroup(model_dir, cfg, total_steps=10)
    store_name = f"wsync-test-{uuid.uuid4().hex[:8]}"
    store = WeightStore.options(name=store_name).remote()
    worker = ray.remote(probed_rollout_cls()).options(num_cpus=1, max_restarts=1, max_task_retries=1).remote(
        model_dir, ENGINE, {}, 4, store_name)
    try:
        assert group.weight_sync == "broadcast"
        before = ray.get(worker.transcripts.remote(clips(), SP))
        # sync 1: the group forms, buckets (0.5 MB: several per sync) stream into vLLM
        group.train_step(batch)
        learner_res, *_, got = ray.get(group.push_weights([worker], version=1, store=store))
        assert learner_res["status"] == "ok" and learner_res["formed"] and got == "broadcast"
        assert learner_res["bytes"] == 4 * sum(p.numel() for p in ArkAsrForConditionalGeneration.from_pretrained(
            model_dir).parameters())                          # every parameter once, fp32
        after = ray.get(worker.transcripts.remote(clips(), SP))
        assert_same(after, hf_reference(model_dir, group.state_dict()))
        moved = max(np.abs(a.topk_logprobs[0] - b.topk_logprobs[0]).max() for a, b in zip(after, before))
        assert moved > 1e-2                                   # the step really changed the weights
        assert ray.get(worker.get_version.remote()) == 1
        _, published = ray.get(store.latest.remote())
        assert published == 1                                 # kept for restarted actors

        # sync 2 reuses the group
        group.train_step(batch)
        learner_res, *_, got = ray.get(group.push_weights([worker], version=2, store=store))
        assert (learner_res["status"], learner_res["formed"], got) == ("ok", False, "broadcast")
        assert_same(ray.get(worker.transcripts.remote(clips(), SP)), hf_reference(model_dir, group.state_dict()))

        # the actor dies and Ray restarts it: it loads v2 from the WeightStore (the object-store
        # path, with the learner's state dict), and sync 3 forms a new group that includes it
        ray.kill(worker, no_restart=False)
        assert ray.get(worker.get_version.remote()) == 2
        assert_same(ray.get(worker.transcripts.remote(clips(), SP)), hf_reference(model_dir, group.state_dict()))
        group.train_step(batch)
        learner_res, *_, got = ray.get(group.push_weights([worker], version=3, store=store))
        assert (learner_res["status"], learner_res["formations"], got) == ("ok", 2, "broadcast")
        assert_same(ray.get(worker.transcripts.remote(clips(), SP)), hf_reference(model_dir, group.state_dict()))
    finally:
        ray.kill(worker)
        ray.kill(store)
        group.shutdown()


def test_opd_run_with_broadcast_sync(ray_local, tmp_path):
    """A short async OPD run whose every sync goes through the broadcast group (formed once)."""
    import pathlib

    from ark_ray.config import OpdConfig, load_config
    from ark_ray.model.factory import make_tokenizer
    from ark_ray.opd.controller import OpdController

    repo = pathlib.Path(__file__).resolve().parents[1]
    tok = make_tokenizer("tiny")
    save_random_model(tmp_path / "teacher", "tiny", tokenizer=tok, seed=1, initializer_range=0.2)
    save_random_model(tmp_path / "student", "tiny", tokenizer=tok, seed=2, initializer_range=0.2)
    cfg = load_config(OpdConfig, repo / "jobs/configs/opd_tiny.yaml", {
        "student": str(tmp_path / "student"), "teacher": str(tmp_path / "teacher"),
        "output_dir": str(tmp_path / "run"), "steps": 2, "rollout_batch_size": 4, "eval_max_samples": 4,
        "save_every": 0, "topk": 4, "sampling": {"max_new_tokens": 6},
        "rollout_engine": {"backend": "vllm", "max_num_seqs": 8, "max_model_len": 512},
        "learner": {"weight_sync": "broadcast", "weight_sync_timeout_s": 300,
                    "weight_sync_collective_timeout_s": 60}})
    ctl = OpdController(cfg)
    try:
        s = ctl.run()
        assert s["steps"] == 2 and s["student_wer_after"] is not None
        last = ray.get(ctl.learner._broadcast.last)
        assert last["status"] == "ok" and last["formations"] == 1         # one group for the whole run
        assert ray.get(ctl.rollouts[0].get_version.remote()) == ctl.version >= 3   # 2 steps + the final sync
        assert ray.get(ctl.store.latest.remote())[1] == ctl.version                # kept for restarts
    finally:
        ctl.shutdown()
