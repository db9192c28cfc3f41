"""DeepSpeed learner group under Ray on CPU: ZeRO 2/3, world sizes, micro-batching and accumulation,
the loss interface (SFT cross-entropy, OPD union-top-k KL), resume, HF export, manifests."""
import json

import numpy as np
import pytest
import torch

from ark_ray.config import LearnerConfig
from ark_ray.data.manifest import ManifestError, read_manifest
from ark_ray.model import ArkAsrForConditionalGeneration
from ark_ray.model.factory import save_random_model
from ark_ray.model.processor import ArkAsrProcessor
from ark_ray.opd.loss import OpdLoss, gather_teacher_logprobs, opd_kl_loss
from ark_ray.train.learner import LearnerGroup
from ark_ray.train.losses import TokenCrossEntropy


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("learner_model")
    save_random_model(d, "tiny", seed=3)
    return str(d)


@pytest.fixture(scope="module")
def batch(model_dir):
    proc = ArkAsrProcessor.from_pretrained(model_dir)
    rng = np.random.default_rng(0)
    waves = [(0.1 * rng.standard_normal(8000)).astype(np.float32) for _ in range(4)]
    # equal-length targets so every rank holds the same number of loss tokens
    b = proc(waves, texts=["call alice", "play music", "move left", "open door"], padding_side="right")
    return {k: v.numpy() for k, v in b.items()}


def test_learner_ranks_pack_on_one_node_where_they_fit():
    from ark_ray.train.learner import pack_strategy

    ranks = [LearnerGroup.bundle(LearnerConfig(use_gpu=True, num_gpus=1, num_cpus=8, resources={"ark_learner": 1}))] * 8
    assert ranks[0] == {"CPU": 8, "GPU": 1, "ark_learner": 1}
    eight = {"CPU": 96, "GPU": 8, "ark_learner": 8}
    assert pack_strategy(ranks, [{"CPU": 4, "GPU": 1}, eight]) == "STRICT_PACK"
    assert pack_strategy(ranks, [{"CPU": 96, "GPU": 8}]) == "PACK"                    # no ark_learner there
    assert pack_strategy(ranks, [{"CPU": 48, "GPU": 4, "ark_learner": 4}] * 2) == "PACK"   # only across two nodes
    assert pack_strategy([LearnerGroup.bundle(LearnerConfig())] * 2, []) == "PACK"     # no node yet (autoscaler)


def train(model_dir, batch, steps, **kw):
    cfg = LearnerConfig(lr=1e-3, seed=0, **kw)
    g = LearnerGroup(model_dir, cfg, total_steps=10)
    try:
        return [g.train_step(batch)["loss"] for _ in range(steps)], g
    except Exception:
        g.shutdown()
        raise


@pytest.mark.parametrize("stage", [2, 3])
def test_loss_falls_and_world_sizes_agree(ray_local, model_dir, batch, stage):
    one, g1 = train(model_dir, batch, 4, num_workers=1, zero_stage=stage)
    g1.shutdown()
    two, g2 = train(model_dir, batch, 4, num_workers=2, zero_stage=stage)
    g2.shutdown()
    assert one[-1] < one[0] * 0.9
    np.testing.assert_allclose(one, two, rtol=2e-3)


@pytest.fixture(scope="module")
def uneven_batch(model_dir):
    """Rows with different target lengths, whose halves (rows 0-1, 2-3) hold equal token counts."""
    proc = ArkAsrProcessor.from_pretrained(model_dir)
    rng = np.random.default_rng(1)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (8000, 5600, 7200, 4000)]
    texts = ["call", "play the music now", "play the music now", "call"]
    b = {k: v.numpy() for k, v in proc(waves, texts=texts, padding_side="right").items()}
    n = (b["labels"][:, 1:] != -100).sum(1)
    assert n[0] != n[1] and n[0] + n[1] == n[2] + n[3]
    return b


def opd_batch(model_dir, batch, seed=0):
    """The SFT batch as an OPD learner batch: its targets as the responses, random teacher buckets."""
    vocab = ArkAsrForConditionalGeneration.from_pretrained(model_dir).config.vocab_size
    rng = np.random.default_rng(seed)
    trained = batch["labels"] != -100
    start = trained.argmax(1)
    lens = trained.sum(1)
    t, k = int(lens.max()), 3
    teacher = torch.from_numpy(rng.standard_normal((len(start), t, vocab))).float() * 3
    union = torch.from_numpy(np.stack([[rng.choice(vocab, 2 * k, replace=False) for _ in range(t)]
                                       for _ in start]))
    lp, tail = gather_teacher_logprobs(teacher, union)
    return dict(batch, response_start=start, union_ids=union.numpy(), teacher_logprobs=lp.numpy(),
                teacher_tail_logprob=tail.numpy(), response_mask=np.arange(t)[None, :] < lens[:, None])


def test_losses_match_the_full_sequence_reference(model_dir, uneven_batch):
    """Both loss objects compute logits on the span they read only; the sums equal the full-logits ones."""
    model = ArkAsrForConditionalGeneration.from_pretrained(model_dir).eval()
    tb = {k: torch.from_numpy(np.asarray(v)) for k, v in uneven_batch.items()}
    with torch.no_grad():
        ce, st = TokenCrossEntropy()(model, tb)
        ref = model(**{k: v for k, v in tb.items() if k != "labels"}).logits
        want = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), tb["labels"][:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        torch.testing.assert_close(ce, want, rtol=1e-5, atol=1e-5)
        assert st["tokens"] == TokenCrossEntropy().tokens(uneven_batch)

        ob = opd_batch(model_dir, uneven_batch)
        tob = {k: torch.from_numpy(np.asarray(v)) for k, v in ob.items()}
        kl, st = OpdLoss(tau=2.0)(model, tob)
        tt = tob["union_ids"].shape[1]
        pos = (tob["response_start"][:, None] - 1 + torch.arange(tt)[None, :]).clamp(max=ref.shape[1] - 1)
        logits = ref.gather(1, pos[..., None].expand(-1, -1, ref.shape[-1]))
        want, _ = opd_kl_loss(logits, tob["union_ids"], tob["teacher_logprobs"], tob["teacher_tail_logprob"],
                              tob["response_mask"], tau=2.0, reduction="sum")
        torch.testing.assert_close(kl, want, rtol=1e-5, atol=1e-6)
        assert kl > 0 and st["positions"] == OpdLoss().tokens(ob)


def test_gradient_checkpointing_recomputes_encoder_and_decoder_layers(model_dir, uneven_batch):
    """learner.gradient_checkpointing: every encoder and decoder layer runs again in the backward
    pass, and the gradients are those of the plain model."""
    tb = {k: torch.from_numpy(np.asarray(v)) for k, v in uneven_batch.items()}
    grads, calls = [], []
    for ckpt in (False, True):
        model = ArkAsrForConditionalGeneration.from_pretrained(model_dir).train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = list(model.audio_encoder.whisper.layers) + list(model.model.layers)
        n = [0] * len(layers)
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda *a, i=i: n.__setitem__(i, n[i] + 1))  # recompute stops early
        loss, _ = TokenCrossEntropy()(model, tb)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        calls.append(n)
    assert calls[0] == [1] * len(calls[0]) and calls[1] == [2] * len(calls[1])
    assert grads[0].keys() == grads[1].keys() and any("audio_encoder.whisper.layers" in k for k in grads[1])
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, rtol=1e-5, atol=1e-7)


def _params(g):
    return {k: v.clone() for k, v in g.state_dict().items()}


def test_micro_batches_and_accumulation_give_the_full_batch_update(ray_local, model_dir, uneven_batch):
    """One full batch on one micro-batch == its halves as two accumulated batches of one-row micro-batches."""
    def group(**kw):
        return LearnerGroup(model_dir, LearnerConfig(lr=1e-3, seed=0, num_workers=1, **kw), total_steps=10)

    g = group(micro_batch_size=0)
    try:
        full = g.train_step(uneven_batch)
        p_full = _params(g)
    finally:
        g.shutdown()
    assert full["micro_batches"] == 1 and full["optimizer_step"] and full["peak_mem_gb"] > 0
    halves = [{k: v[s] for k, v in uneven_batch.items()} for s in (slice(0, 2), slice(2, 4))]
    g = group(micro_batch_size=1, grad_accum_steps=2)
    try:
        p0 = _params(g)
        first = g.train_step(halves[0])
        assert not first["optimizer_step"] and first["grad_norm"] is None and first["micro_batches"] == 2
        assert all(torch.equal(p0[k], v) for k, v in _params(g).items())   # accumulated, not stepped
        second = g.train_step(halves[1])
        p_acc = _params(g)
    finally:
        g.shutdown()
    assert second["optimizer_step"]
    # the grad norm (before clipping) sees any mis-scaled micro-batch; Adam's first step would hide it
    np.testing.assert_allclose(second["grad_norm"], full["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose((first["loss"] + second["loss"]) / 2, full["loss"], rtol=1e-5)
    # Adam's first step moves a weight by lr * g / (|g| + eps) (lr = 1e-3): ill-conditioned where |g|
    # is within ~100 eps of 0 (summation order shows there), exact to fp32 rounding elsewhere
    compared = total = 0
    for k, v in p_full.items():
        sure = (v - p0[k]).abs() > 0.99e-3
        torch.testing.assert_close(p_acc[k][sure], v[sure], rtol=1e-5, atol=1e-7)
        compared, total = compared + int(sure.sum()), total + v.numel()
    assert compared > 0.5 * total


def test_opd_loss_trains_through_the_learner(ray_local, model_dir, uneven_batch):
    """The OPD loss object on two ranks in one-row micro-batches: the reported loss is the per-token
    sum of the loss on the initial weights, and it falls."""
    ob = opd_batch(model_dir, uneven_batch)
    model = ArkAsrForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.no_grad():
        kl, _ = OpdLoss(tau=1.5)(model, {k: torch.from_numpy(np.asarray(v)) for k, v in ob.items()})
    g = LearnerGroup(model_dir, LearnerConfig(lr=3e-3, seed=0, num_workers=2, micro_batch_size=1),
                     total_steps=10, loss=OpdLoss(tau=1.5))
    try:
        stats = [g.train_step(ob) for _ in range(3)]
    finally:
        g.shutdown()
    tokens = int(ob["response_mask"].sum())
    assert stats[0]["tokens"] == tokens and stats[0]["micro_batches"] == 2
    np.testing.assert_allclose(stats[0]["loss"], float(kl) / tokens, rtol=1e-4)
    np.testing.assert_allclose(stats[0]["kl"], stats[0]["loss"] / 1.5 ** 2, rtol=1e-6)
    assert stats[-1]["loss"] < stats[0]["loss"] and 0 < stats[0]["teacher_mass"] < 1


def test_resume_from_s3_continues_with_the_same_losses(ray_local, model_dir, batch, s3_client, moto_endpoint):
    """Two ZeRO-2 ranks checkpoint to S3 (moto) through the run folder: each rank uploads its own
    shards; a checkpoint interrupted before its `latest` pointer is left aside, and a new group
    resumes from the previous one with the losses of an uninterrupted run."""
    from ark_ray.config import S3Config
    from ark_ray.data.run_storage import RunStorage
    from ark_ray.train.checkpoints import Checkpoints

    s3_client.create_bucket(Bucket="learner-ck")
    storage = RunStorage("s3://learner-ck/run", S3Config(endpoint_url=moto_endpoint, access_key_id="test",
                                                         secret_access_key="test", region="us-east-1"))
    ckpts = Checkpoints(storage, keep=1)
    full, g = train(model_dir, batch, 4, num_workers=2, zero_stage=2)
    g.shutdown()
    first, g = train(model_dir, batch, 2, num_workers=2, zero_stage=2)
    try:
        g.save_checkpoint(storage, ckpts.begin(1), {"data_step": 1})   # pretend: an earlier one
        ckpts.commit(1, {"state.json": {"data_step": 1}})
        saved = g.save_checkpoint(storage, ckpts.begin(2), {"data_step": 2})
        ckpts.commit(2, {"state.json": {"data_step": 2}})
        g.train_step(batch)
        g.save_checkpoint(storage, ckpts.begin(3), {"data_step": 3})   # the driver dies before commit
    finally:
        g.shutdown()
    # every rank uploaded its own ZeRO shard; rank 0 the model states
    shards = {r["rank"]: [f for f in r["files"] if "zero_pp_rank" in f] for r in saved}
    assert shards == {r: [f"deepspeed/zero_pp_rank_{r}_mp_rank_00_optim_states.pt"] for r in (0, 1)}
    assert "deepspeed/mp_rank_00_model_states.pt" in saved[0]["files"]
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket="learner-ck")["Contents"]}
    assert {"run/checkpoints/step_2/deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "run/checkpoints/step_3/deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "run/checkpoints/step_2/state.json", "run/checkpoints/latest"} <= keys
    assert not any(k.startswith("run/checkpoints/step_1/") for k in keys)   # keep=1
    assert ckpts.latest() == 2 and ckpts.steps() == [2, 3]
    g = LearnerGroup(model_dir, LearnerConfig(lr=1e-3, seed=0, num_workers=2, zero_stage=2), total_steps=10)
    try:
        assert g.load_checkpoint(storage, ckpts.dir(ckpts.latest()))["data_step"] == 2
        rest = [g.train_step(batch)["loss"] for _ in range(2)]
    finally:
        g.shutdown()
    np.testing.assert_allclose(first + rest, full, rtol=1e-5)


def test_export_reloads_with_identical_logits(ray_local, model_dir, batch, tmp_path):
    _, g = train(model_dir, batch, 2, num_workers=1, zero_stage=2)
    try:
        sd = g.state_dict()
        g.export_hf(str(tmp_path / "exp"), dtype=torch.float32)
    finally:
        g.shutdown()
    m = ArkAsrForConditionalGeneration.from_pretrained(tmp_path / "exp").eval()
    ref = ArkAsrForConditionalGeneration.from_pretrained(model_dir).eval()
    ref.load_state_dict(sd, strict=False)
    inputs = {k: torch.from_numpy(v) for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(m(**inputs).logits, ref(**inputs).logits)
    assert ArkAsrProcessor.from_pretrained(tmp_path / "exp").token_ids.audio > 0


@pytest.mark.parametrize("line,msg", [
    ('{"text": "x"}', "missing or empty 'audio'"),
    ('not json', "not valid JSON"),
    ('{"audio": "a.wav"}', "missing text field"),
    ('{"audio": "a.wav", "text": "x", "begin_time": "soon"}', "begin_time must be a number"),
    ('{"audio": "a.wav", "text": "x", "begin_time": 2, "end_time": 1}', "bad_segment: begin_time 2 > end_time 1"),
])
def test_bad_manifest_rows(tmp_path, line, msg):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"audio": "ok.wav", "text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(ManifestError, match=msg) as e:
        read_manifest(p)
    assert "m.jsonl:2" in str(e.value)


def test_manifest_resolves_relative_paths(tmp_path):
    p = tmp_path / "sub" / "m.jsonl"
    p.parent.mkdir()
    p.write_text(json.dumps({"audio": "a/b.flac", "text": "x", "extra": 1}) + "\n")
    (row,) = read_manifest(p)
    assert row["audio"] == str(tmp_path / "sub" / "a" / "b.flac") and row["extra"] == 1
