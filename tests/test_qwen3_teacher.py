"""Qwen3-ASR as the OPD teacher: the token map, masked and counted unmapped positions, HF scoring
checked against transformers' own processor, vLLM against HF (max |delta log p| <= 1e-3, fp32) and a
3-step OPD run through jobs/opd.py. The teacher is a tiny random Qwen3-ASR written by the repo's
builder; its tokenizer is the student's BPE with permuted ids, one merged token removed and
Qwen3-ASR's special tokens."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

STUDENT = "assets/models/student"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, repo_root):
    from ark_ray.opd.qwen3_random import write_random_qwen3_asr

    return str(write_random_qwen3_asr(tmp_path_factory.mktemp("q3") / "teacher", repo_root / STUDENT, "tiny"))


@pytest.fixture(scope="module")
def student_proc(repo_root):
    from ark_ray.model.processor import ArkAsrProcessor

    return ArkAsrProcessor.from_pretrained(repo_root / STUDENT)


@pytest.fixture(scope="module")
def removed(repo_root):
    from ark_ray.opd.qwen3_random import teacher_tokenizer_json

    return teacher_tokenizer_json((repo_root / STUDENT / "tokenizer.json").read_text())[1]


def _vmap(student_proc, teacher_dir):
    from transformers import AutoTokenizer

    from ark_ray.opd.vocab_map import VocabMap

    st = student_proc.tokenizer
    return VocabMap(st, AutoTokenizer.from_pretrained(teacher_dir),
                    student_proc.allowed_token_mask(len(st)).numpy())


def test_vocab_map_by_token_string(student_proc, teacher_dir, removed):
    st = student_proc.tokenizer
    vm = _vmap(student_proc, teacher_dir)
    tt = vm.teacher_tok
    sv = st.get_vocab()
    assert removed and removed in sv and removed not in tt.get_vocab()
    # every other text token maps by its string, to a different (permuted) id
    text_ids = [i for s, i in sv.items() if i < 1024 and s != removed]
    assert all(tt.convert_ids_to_tokens(int(vm.s2t[i])) == st.convert_ids_to_tokens(i) for i in text_ids)
    assert sum(vm.s2t[i] != i for i in text_ids) > 0.9 * len(text_ids)
    assert vm.s2t[sv[removed]] == -1
    # shared specials map (EOS is trained), ARK-only ones do not
    assert tt.convert_ids_to_tokens(int(vm.s2t[sv["<|im_end|>"]])) == "<|im_end|>"
    assert vm.s2t[sv["<|user|>"]] == -1 and vm.s2t[sv["<|audio|>"]] == -1
    # t2s is the inverse on the student's allowed ids only
    allowed = student_proc.allowed_token_mask(len(st)).numpy()
    for t in np.flatnonzero(vm.t2s >= 0):
        assert vm.s2t[vm.t2s[t]] == t and allowed[vm.t2s[t]]
    assert vm.t2s[vm.s2t[sv["<|im_end|>"]]] == sv["<|im_end|>"]


def test_forcing_keeps_the_text_and_aligns_later_tokens(student_proc, teacher_dir, removed):
    st = student_proc.tokenizer
    vm = _vmap(student_proc, teacher_dir)
    sv = st.get_vocab()
    resp = st("one two three", add_special_tokens=False)["input_ids"]
    resp = resp[:1] + [sv[removed], sv["<|user|>"]] + resp[1:] + [sv["<|im_end|>"]]
    ids, off, ok = vm.force(resp)
    # the teacher reads exactly the student's text
    assert vm.teacher_tok.decode(ids) == st.decode(resp)
    assert ok.tolist() == [True, False, False] + [True] * (len(resp) - 3)
    assert len(vm.pieces(sv[removed])) >= 2
    for t, sid in enumerate(resp):   # scored tokens sit at their offset, one teacher token each
        if ok[t]:
            assert ids[off[t]] == vm.s2t[sid] and (t + 1 == len(resp) or off[t + 1] == off[t] + 1)


def test_student_buckets_drop_unmapped_teacher_ids_into_the_tail(student_proc, teacher_dir):
    from ark_ray.opd.vocab_map import student_buckets

    vm = _vmap(student_proc, teacher_dir)
    unmapped_t = int(np.flatnonzero(vm.t2s < 0)[0])
    a, b, c = (int(x) for x in np.flatnonzero(vm.t2s >= 0)[:3])
    # teacher top-3: a, an unmapped id, b; the student's top-2: b, c (c's teacher log-prob known)
    known = np.array([[a, unmapped_t, b, c]])
    lp = np.log(np.array([[0.5, 0.2, 0.1, 0.05]]))
    union, ulp, tail = student_buckets(known, lp, 3, np.array([[vm.t2s[b], vm.t2s[c]]]), vm)
    assert union[0].tolist()[:3] == [vm.t2s[a], vm.t2s[b], vm.t2s[c]] and (union[0, 3:] == -1).all()
    np.testing.assert_allclose(np.exp(ulp[0, :3]), [0.5, 0.1, 0.05], rtol=1e-6)
    np.testing.assert_allclose(np.exp(tail[0]), 1 - 0.65, rtol=1e-6)   # the unmapped 0.2 stays in the tail
    # a student id whose teacher log-prob is unknown leaves the union on both sides
    union2, _, tail2 = student_buckets(known[:, :3], lp[:, :3], 3, np.array([[vm.t2s[c], -1]]), vm)
    assert vm.t2s[c] not in union2[0] and np.isclose(np.exp(tail2[0]), 1 - 0.6)


def test_language_from_manifest_or_script():
    from ark_ray.eval.language import guess_language, language_name

    assert language_name("en") == "English" and language_name("ZH") == "Chinese" and language_name("German") == "German"
    assert guess_language("今日は", None) == "Japanese" and guess_language("你好", "yue") == "Cantonese"
    assert guess_language("你好") == "Chinese" and guess_language("안녕") == "Korean"
    assert guess_language("привет") == "Russian" and guess_language("hello", "fr") == "French"
    assert guess_language("hello") == "English"


def _batch(student_proc, removed, n_rows=3, k=4, seed=0):
    from ark_ray.opd.trajectory import TrajectoryBatch

    st = student_proc.tokenizer
    sv = st.get_vocab()
    rng = np.random.default_rng(seed)
    texts = ["three one zero six four", "send a message to david", "play some music"][:n_rows]
    resps, topk = [], []
    for j, tx in enumerate(texts):
        r = st(tx, add_special_tokens=False)["input_ids"]
        if j == 0:
            r = r[:2] + [sv[removed]] + r[2:]
        r = r + [sv["<|im_end|>"]]
        resps.append(r)
        tk = rng.integers(0, 1024, size=(len(r), k))
        tk[:, 0] = r                                 # the sampled token is in the student's top-k
        topk.append(tk)
    waves = [rng.standard_normal(int(16000 * d)).astype(np.float32) * 0.1 for d in (1.3, 2.6, 0.4)[:n_rows]]
    b = TrajectoryBatch.from_rollouts(sample_ids=[f"s{i}" for i in range(n_rows)], positions=list(range(n_rows)),
                                      audio_refs=[""] * n_rows, prompt_ids=[[1]] * n_rows, responses=resps,
                                      student_topk=topk, policy_version=0, reference_texts=texts,
                                      pred_texts=texts, k=k)
    return b, waves


def test_hf_teacher_scores_mapped_positions_like_transformers(student_proc, teacher_dir, removed):
    from transformers import AutoProcessor, Qwen3ASRForConditionalGeneration

    from ark_ray.opd.loss import opd_kl_loss
    from ark_ray.opd.qwen3_teacher import Qwen3AsrTeacher

    k = 4
    st = student_proc.tokenizer
    q = Qwen3AsrTeacher(teacher_dir, st, student_proc.allowed_token_mask(len(st)).numpy(), k, engine="hf",
                        device="cpu", dtype="float32", max_batch=2, languages={"s1": "de"})
    batch, waves = _batch(student_proc, removed, k=k)
    union, logp, tail, scored = q.score_batch(batch, waves)
    # the removed token (row 0, position 2) is not scored, every other response position is
    assert not scored[0, 2] and not (scored & ~batch.response_mask).any()
    assert (scored == batch.response_mask).sum() == batch.response_mask.size - 1
    batch.teacher_ids, batch.teacher_logprobs, batch.teacher_tail_logprob, batch.teacher_mask = union, logp, tail, scored
    batch.input_features, batch.feature_lengths = np.zeros((3, 128, 8), np.float32), np.full(3, 8)
    assert batch.unmapped_positions == 1
    lb = batch.to_learner_batch(0)
    # the unmapped token stays in the student's sequence (its own ids) but out of the loss
    assert lb["response_mask"].sum() == batch.response_mask.sum() - 1
    assert lb["input_ids"][0, 1 + 2] == batch.response_ids[0, 2]
    # teacher buckets are distributions; the loss accepts them
    tot = np.exp(logp[scored]).sum(-1) + np.exp(tail[scored])
    np.testing.assert_allclose(tot, 1.0, atol=1e-4)
    sl = torch.randn(*scored.shape, len(st))
    loss, stats = opd_kl_loss(sl, torch.as_tensor(union).long(), torch.as_tensor(logp), torch.as_tensor(tail),
                              torch.as_tensor(scored))
    assert torch.isfinite(loss) and stats["positions"] > 0
    # independent check: transformers' processor builds the prompt and features, forced on the mapped ids
    proc = AutoProcessor.from_pretrained(teacher_dir)
    model = Qwen3ASRForConditionalGeneration.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    for i, lang in ((1, "German"), (2, "English")):
        resp = batch.response_ids[i][batch.response_mask[i]].tolist()
        forced, off, ok = q.vmap.force(resp)
        prompt = proc.apply_chat_template([{"role": "system", "content": ""},
                                           {"role": "user", "content": [{"type": "audio", "audio": ""}]}],
                                          add_generation_prompt=True, tokenize=False)
        inp = proc(text=[prompt + f"language {lang}<asr_text>"], audio=[waves[i]], sampling_rate=16000)
        ids = torch.cat([inp["input_ids"], torch.tensor([forced])], 1)
        with torch.inference_mode():
            lp = torch.log_softmax(model(input_ids=ids, input_features=inp["input_features"],
                                         input_features_mask=inp["input_features_mask"]).logits[0].float(), -1)
        p0 = inp["input_ids"].shape[1]
        for t in np.flatnonzero(ok):
            for u in range(2 * k):
                if union[i, t, u] >= 0:
                    want = lp[p0 - 1 + off[t], q.vmap.s2t[union[i, t, u]]].item()
                    assert abs(want - logp[i, t, u]) < 1e-4


@pytest.mark.timeout(900)
def test_vllm_teacher_matches_hf(teacher_dir, repo_root, tmp_path):
    """vLLM (prompt_logprobs) against HF on the same rows: fp32, max |delta log p| <= 1e-3."""
    out = tmp_path / "parity.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo_root / "tests" / "shims"), str(repo_root)]))
    log = tmp_path / "parity.log"
    # output to a file and a session of its own: any engine process the script leaves behind is
    # killed with the session, and no pipe of ours waits on it
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, str(repo_root / "tests" / "qwen3_vllm_parity.py"), teacher_dir,
                              str(out)], cwd=repo_root, env=env, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=880)
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert rc == 0, log.read_text()[-8000:]
    res = json.loads(out.read_text())
    assert res["scored_equal"] and res["unions_equal"], res
    assert res["positions"] > 10 and res["max_abs_dlogp"] <= 1e-3 and res["max_abs_dtail_p"] <= 1e-3, res
    # with vLLM's default 2k log-probs, each id it keeps has HF's log-prob
    assert res["subset_entries"] > 0 and res["subset_max_abs_dlogp"] <= 1e-3, res


def test_opd_three_steps_with_qwen3_teacher(ray_local, repo_root, tmp_path):
    """jobs/opd.py with the committed qwen3_asr config, 3 steps on CPU."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("opd_job", repo_root / "jobs" / "opd.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "run"
    s = job.main(["--config", str(repo_root / "jobs" / "configs" / "opd_qwen3_tiny.yaml"), "--steps=3",
                  f"--output_dir={out}", "--eval_max_samples=2", "--save_every=0", "--rollout_batch_size=4",
                  "--sampling.max_new_tokens=8"])
    assert s["steps"] == 3 and s["teacher_wer"] is not None     # the teacher's own transcripts ran too
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r.get("kind", "step") == "step" and "kl" in r]
    assert len(steps) == 3 and all(np.isfinite(r["kl"]) and r["union_size"] > 1 for r in steps)
    assert all(isinstance(r["unmapped_positions"], int) and r["unmapped_positions"] >= 0 for r in steps)
