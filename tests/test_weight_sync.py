"""Weight sync from a DeepSpeed learner into rollout engines, on the paths CPU can run.

Object store in many small buckets, and the collective broadcast (gloo): after a learner step and a
sync, the vLLM engine inside a RolloutWorker decodes exactly like an HF model holding the learner's
new weights. Buckets carry the engine's dtype (bf16 when the engine is bf16). A receiver that
raises fails the sync with its error. For broadcast: the group outlives one sync; a rollout actor
lost mid-sync is left out (the broadcast aborts instead of waiting for it), and once Ray has
restarted it the next sync forms a new group with it. (An OPD
run with `weight_sync=broadcast` is tests/test_opd.py's async run; CUDA IPC runs in bench/gpu_check.py.)
"""
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
from ark_ray.engines.weight_buckets import layer_key  # noqa: E402
from ark_ray.train.weight_sync import SyncFailed, bucket_plan, resolve_mode  # noqa: E402

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


def test_bucket_plan_packs_by_dtype_and_size_and_never_splits_a_layer():
    ps = [("a", torch.zeros(10)), ("b", torch.zeros(10)), ("c", torch.zeros(30)),
          ("d", torch.zeros(4, dtype=torch.bfloat16)), ("e", torch.zeros(2))]
    plan = bucket_plan(ps, bucket_bytes=100)
    assert [[n for n, _ in b["items"]] for b in plan] == [["a", "b"], ["c"], ["d"], ["e"]]
    assert [b["dtype"] for b in plan] == ["float32", "float32", "bfloat16", "float32"]
    assert plan[1]["items"][0] == ("c", (30,))
    # a target dtype: every bucket in it, sizes counted in it
    assert [b["dtype"] for b in bucket_plan(ps, 100, torch.bfloat16)] == ["bfloat16"] * 2
    # one layer's parameters stay together even past the bucket size
    layer = [(f"model.layers.3.self_attn.{n}.weight", torch.zeros(20)) for n in "qkv"]
    plan = bucket_plan([("model.embed_tokens.weight", torch.zeros(20))] + layer, bucket_bytes=100)
    assert [[n for n, _ in b["items"]] for b in plan] == [["model.embed_tokens.weight"], [n for n, _ in layer]]
    assert layer_key("model.layers.12.mlp.up_proj.weight") == "model.layers.12"


def test_auto_picks_ipc_on_a_shared_gpu_nccl_across_gpus_object_store_without():
    learner = {"node": "n1", "gpus": ["0"]}
    assert resolve_mode("auto", learner, {"node": "n1", "gpus": ["0"]}) == "ipc"
    assert resolve_mode("auto", learner, {"node": "n1", "gpus": ["1"]}) == "broadcast"
    assert resolve_mode("auto", learner, {"node": "n2", "gpus": ["0"]}) == "broadcast"   # another node
    assert resolve_mode("auto", {"node": "n1", "gpus": []}, {"node": "n1", "gpus": []}) == "object_store"
    assert resolve_mode("auto", learner, {"node": "n1", "gpus": []}) == "object_store"
    with pytest.raises(ValueError, match="cannot use NCCL between processes on one GPU"):
        resolve_mode("broadcast", learner, {"node": "n1", "gpus": ["0"]})
    with pytest.raises(ValueError, match="needs the rollout engine on learner rank 0's GPU"):
        resolve_mode("ipc", learner, {"node": "n1", "gpus": ["1"]})
    assert resolve_mode("broadcast", {"node": "n1", "gpus": []}, {"node": "n1", "gpus": []}) == "broadcast"  # gloo


def _learner(model_dir, **kw):
    cfg = LearnerConfig(**{"lr": 2e-2, "seed": 0, "weight_sync_timeout_s": 300, "weight_sync_collective_timeout_s": 60,
                           **kw})
    return LearnerGroup(model_dir, cfg, total_steps=10)


def test_object_store_sync_in_many_bf16_buckets(ray_local, model_dir, batch):
    """Buckets much smaller than the model, in the engine's dtype: a bf16 HF engine ends up holding
    exactly the learner's weights cast to bf16, every bucket object below the bucket size."""
    group = _learner(model_dir, weight_sync="object_store", weight_sync_bucket_mb=0.25)
    worker = ray.remote(RolloutWorker).options(num_cpus=1).remote(
        model_dir, {"backend": "hf", "dtype": "bfloat16"}, {}, 4)
    try:
        group.train_step(batch)
        rec = group.push_weights([worker], version=1)
        assert rec["modes"] == ["object_store"] and rec["version"] == 1
        exported = ray.get(group.workers[0].export_weights.remote("object_store", 9, "bfloat16", 2**18))
        buckets = [ray.get(r) for r in exported["refs"]]
        assert len(buckets) > 3
        for b in buckets:   # in bf16; within the size unless it is one layer alone
            assert b["flat"].dtype == torch.bfloat16
            assert b["flat"].numel() * 2 <= 2**18 or len({layer_key(n) for n, _ in b["items"]}) == 1
        want = ray.get(group.workers[0].weight_digests.remote(["model.embed_tokens.weight",
                                                              "model.layers.0.self_attn.q_proj.weight"], "bfloat16"))
        got = ray.get(worker.weight_digests.remote({n: shape for n, (_, shape) in want.items()}))
        assert got == {n: d for n, (d, _) in want.items()} and ray.get(worker.get_version.remote()) == 1
    finally:
        ray.kill(worker)
        group.shutdown()


def failing_rollout_cls():
    class FailingRollout(RolloutWorker):
        def load_weights(self, mode, export, version):
            raise ValueError(f"disk full while loading v{version}")

    return FailingRollout


def test_a_failing_receiver_fails_the_sync_with_its_error(ray_local, model_dir):
    group = _learner(model_dir, weight_sync="object_store", weight_sync_retries=1)
    worker = ray.remote(failing_rollout_cls()).options(num_cpus=1).remote(model_dir, {"backend": "hf"}, {}, 4)
    try:
        with pytest.raises(SyncFailed, match=r"(?s)rollout worker 0 .*after 2 attempt.*disk full while loading v1"):
            group.push_weights([worker], version=1)
    finally:
        ray.kill(worker)
        group.shutdown()


def _answers_again(actor, timeout_s: float = 300) -> dict:
    """Probe a restarting actor until it answers (calls on it fail while Ray restarts it)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(actor.engine_info.remote())
        except ray.exceptions.ActorUnavailableError:
            assert time.monotonic() < deadline
            time.sleep(0.5)


def test_broadcast_then_object_store_into_vllm_match_hf_and_survive_restart(ray_local, model_dir, batch):
    # weight_sync_timeout_s far beyond the test's own timeout: a sync that waited for a lost
    # receiver instead of aborting would fail the test
    group = _learner(model_dir, weight_sync="broadcast", weight_sync_bucket_mb=0.5, weight_sync_timeout_s=3600)
    worker = ray.remote(probed_rollout_cls()).options(num_cpus=1, max_restarts=1, max_task_retries=0).remote(
        model_dir, ENGINE, {}, 4)
    try:
        ws = group.weight_sync([worker])
        assert ws.describe() == "broadcast"
        before = ray.get(worker.transcripts.remote(clips(), SP))
        # sync 1: the group forms, buckets (0.5 MB: several per sync) stream into vLLM
        group.train_step(batch)
        rec = group.push_weights([worker], version=1)
        assert rec["modes"] == ["broadcast"] and rec["retries"] == 0 and rec["lost"] == []
        assert rec["bytes"] == 4 * sum(p.numel() for p in ArkAsrForConditionalGeneration.from_pretrained(
            model_dir).parameters())                          # every parameter once, fp32 (the engine's dtype)
        after = ray.get(worker.transcripts.remote(clips(), SP))
        assert_same(after, hf_reference(model_dir, group.state_dict()))
        moved = max(np.abs(a.topk_logprobs[0] - b.topk_logprobs[0]).max() for a, b in zip(after, before))
        assert moved > 1e-2                                   # the step really changed the weights
        assert ray.get(worker.get_version.remote()) == 1

        # sync 2 reuses the group
        group.train_step(batch)
        group.push_weights([worker], version=2)
        assert_same(ray.get(worker.transcripts.remote(clips(), SP)), hf_reference(model_dir, group.state_dict()))

        # the actor dies (Ray restarts it, with the initial weights): the sync in flight leaves it out
        # (the learner's broadcast aborted, not waiting for it) instead of failing
        ray.kill(worker, no_restart=False)
        group.train_step(batch)
        rec = group.push_weights([worker], version=3)
        assert rec["lost"] == [0] and 0 in ws.lost and 0 not in ws.versions
        # back: it reports the initial weights; the next sync forms a new group that includes it
        _answers_again(worker)
        assert ray.get(worker.get_version.remote()) == 0
        ws.recovered(0)
        rec = group.push_weights([worker], version=4)
        assert rec["modes"] == ["broadcast"] and rec["lost"] == [] and ws.versions[0] == 4
        assert_same(ray.get(worker.transcripts.remote(clips(), SP)), hf_reference(model_dir, group.state_dict()))
        group.shutdown()

        # the same vLLM worker through the object store, in many small buckets (staged until the
        # last on vLLM's reload path): it then decodes like HF holding that learner's weights
        group = _learner(model_dir, weight_sync="object_store", weight_sync_bucket_mb=0.25)
        group.train_step(batch)
        rec = group.push_weights([worker], version=5)
        assert rec["modes"] == ["object_store"] and ray.get(worker.get_version.remote()) == 5
        assert_same(ray.get(worker.transcripts.remote(clips(), SP)), hf_reference(model_dir, group.state_dict()))
    finally:
        ray.kill(worker)
        group.shutdown()
