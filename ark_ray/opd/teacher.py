"""TeacherScorer actor: a frozen teacher scores the student's own tokens.

Teacher forcing on (audio, student response) in one forward; at each response position t the
union U_t = teacher top-k ∪ student top-k and the teacher's log-probs at U_t plus the log of the
mass outside U_t (the tail bucket) go into the trajectory: log-probs, never raw logits.
Batches are grouped by duration so padding stays small. Two teacher backends:
* `ark` (HF): an ARK-architecture teacher that shares the student's text vocabulary (checked at
  start-up), so ids need no mapping.
* `qwen3_asr` (HF or vLLM): the Qwen3-ASR teacher of open-audio-opd's OPD training script, with
  its own vocabulary, through the explicit string-based id map (ark_ray/opd/qwen3_teacher.py,
  ark_ray/opd/vocab_map.py). Response
  positions it cannot score (a student token with no teacher token) are cleared in
  `teacher_mask`: out of the loss, and counted as `unmapped_positions`.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import ray
import torch

from ark_ray.opd.trajectory import TrajectoryBatch


def check_shared_vocabulary(teacher_tok, student_tok) -> None:
    """Refuse a teacher whose tokenizer maps text differently from the student's."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        diff = len(set(tv.items()) ^ set(sv.items()))
        raise ValueError(f"teacher and student tokenizers differ ({diff} entries): OPD needs a shared "
                         "vocabulary or an explicit, tested id map")


class TeacherScorer:
    def __init__(self, teacher_dir: str, student_dir: str, topk: int, tau: float = 1.0,
                 device: str = "auto", dtype: str = "auto", max_batch: int = 16, gpu_gate: Optional[list] = None,
                 backend: str = "ark", engine: str = "hf", language: Optional[str] = None,
                 logprobs_k: int = 0, engine_opts: Optional[dict] = None):
        """`gpu_gate`: [ObjectRef] to wait for before touching the GPU (the rollout engines' memory
        profile, on a shared card); the model loads on the CPU meanwhile. `backend`/`engine`: see
        the module docstring; `language` (for rows whose manifest gives none), `logprobs_k` and
        `engine_opts` (vLLM: max_model_len, max_num_seqs, max_num_batched_tokens,
        gpu_memory_utilization) only matter for qwen3_asr."""
        from ark_ray.model import ArkAsrForConditionalGeneration
        from ark_ray.model.processor import ArkAsrProcessor

        self.backend = backend
        self.qwen3 = None
        if backend == "qwen3_asr":
            from ark_ray.opd.qwen3_teacher import Qwen3AsrTeacher

            self.processor = ArkAsrProcessor.from_pretrained(student_dir)   # the learner's features
            allowed = self.processor.allowed_token_mask(len(self.processor.tokenizer)).numpy()
            self.qwen3 = Qwen3AsrTeacher(teacher_dir, self.processor.tokenizer, allowed, topk, tau, engine=engine,
                                         device=device, dtype=dtype, max_batch=max_batch, logprobs_k=logprobs_k,
                                         language=language,
                                         engine_opts=engine_opts, gpu_gate=gpu_gate)
            self.topk, self.tau, self.max_batch = topk, tau, max_batch
            return
        if backend != "ark":
            raise ValueError(f"teacher backend must be 'ark' or 'qwen3_asr', got {backend!r}")
        if engine != "hf":
            raise ValueError("the ark teacher backend scores with HF only (teacher_engine.backend: hf)")
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if device == "auto" else device))
        dt = (torch.bfloat16 if self.device.type == "cuda" else torch.float32) if dtype == "auto" else getattr(torch, dtype)
        self.processor = ArkAsrProcessor.from_pretrained(teacher_dir)
        check_shared_vocabulary(self.processor.tokenizer, ArkAsrProcessor.from_pretrained(student_dir).tokenizer)
        model = ArkAsrForConditionalGeneration.from_pretrained(teacher_dir, dtype=dt).eval()
        if gpu_gate:
            ray.get(gpu_gate[0])
        self.model = model.to(self.device)
        self.dtype = dt
        self.topk, self.tau, self.max_batch = topk, tau, max_batch
        vocab = self.model.config.vocab_size
        self.blocked = ~self.processor.allowed_token_mask(vocab).to(self.device)

    def ready(self) -> dict:
        """Where this teacher runs (node, GPUs, pid), once it is loaded: the controller times start-up
        by role with it, and probes a lost teacher with it until Ray has restarted it."""
        from ark_ray.train.weight_sync import placement

        return placement()

    @torch.inference_mode()
    def score(self, batch: TrajectoryBatch, clips) -> TrajectoryBatch:
        """Fill teacher_ids / teacher_logprobs / teacher_tail_logprob and attach the features;
        `clips` is the rollout's ClipRefs (this actor fetches the decoded audio itself)."""
        from ark_ray.data.clip_stream import load_clips
        from ark_ray.opd.loss import gather_teacher_logprobs, union_topk

        t0 = time.perf_counter()
        loaded = load_clips(clips)
        at = {p: i for i, p in enumerate(loaded.positions)}
        order = [at[int(p)] for p in batch.position]   # the trajectory's rows, in its own order
        waves = [loaded.waves[i] for i in order]
        if self.qwen3 is not None:
            # the prompt language of each row: the manifest's `language` column where it has one
            langs = loaded.columns.get("language") or [None] * len(loaded)
            self.qwen3.languages = {loaded.ids[i]: langs[i] for i in order if langs[i]}
            return self._score_qwen3(batch, waves, t0)
        b, t_max = batch.response_ids.shape
        k = self.topk
        u = 2 * k
        union = np.full((b, t_max, u), -1, np.int32)
        logp = np.full((b, t_max, u), -np.inf, np.float32)
        tail = np.zeros((b, t_max), np.float32)
        f = self.processor.featurize(waves)
        feats, frames = f["input_features"], f["feature_lengths"]
        order = np.argsort([len(w) for w in waves], kind="stable")   # duration buckets
        for start in range(0, b, self.max_batch):
            rows = order[start:start + self.max_batch]
            seqs, lens, starts = [], [], []
            for i in rows:
                prompt = self.processor.prompt_ids(self.processor.audio_token_count(len(waves[i])))
                resp = batch.response_ids[i][batch.response_mask[i]].tolist()
                seqs.append(prompt + resp)
                starts.append(len(prompt))
                lens.append(len(resp))
            width = max(map(len, seqs))
            ids = torch.full((len(rows), width), self.processor.token_ids.pad, dtype=torch.long)
            att = torch.zeros_like(ids)
            for j, s in enumerate(seqs):
                ids[j, : len(s)] = torch.tensor(s)
                att[j, : len(s)] = 1
            sel = torch.as_tensor(rows, dtype=torch.long)
            fr = frames[sel]
            mel = feats[sel][..., : int(fr.max())]
            logits = self.model(input_ids=ids.to(self.device), attention_mask=att.to(self.device),
                                input_features=mel.to(self.device, self.dtype),
                                feature_lengths=fr.to(self.device)).logits
            for j, i in enumerate(rows):
                n = lens[j]
                if n == 0:
                    continue
                # position p predicts token p + 1: response token r comes from starts + r - 1
                lg = logits[j, starts[j] - 1: starts[j] - 1 + n].float() / self.tau
                lg = lg.masked_fill(self.blocked[: lg.shape[-1]], float("-inf"))
                t_top = lg.topk(k, dim=-1).indices
                s_top = torch.as_tensor(batch.student_topk_ids[i, :n], device=self.device).long()
                uid = union_topk(t_top, s_top)
                lp, tl = gather_teacher_logprobs(lg, uid)
                union[i, :n, : uid.shape[1]] = uid.cpu().numpy()
                logp[i, :n, : uid.shape[1]] = lp.cpu().numpy()
                tail[i, :n] = tl.cpu().numpy()
        batch.teacher_ids, batch.teacher_logprobs, batch.teacher_tail_logprob = union, logp, tail
        batch.input_features = feats.numpy()
        batch.feature_lengths = frames.numpy()
        batch.timings["teacher_s"] = time.perf_counter() - t0
        return batch

    def _score_qwen3(self, batch: TrajectoryBatch, waves: list, t0: float) -> TrajectoryBatch:
        """The Qwen3-ASR teacher on the mapped student ids (see ark_ray/opd/vocab_map.py)."""
        (batch.teacher_ids, batch.teacher_logprobs, batch.teacher_tail_logprob,
         batch.teacher_mask) = self.qwen3.score_batch(batch, waves)
        f = self.processor.featurize(waves)
        batch.input_features = f["input_features"].numpy()
        batch.feature_lengths = f["feature_lengths"].numpy()
        batch.timings["teacher_s"] = time.perf_counter() - t0
        return batch

    @torch.inference_mode()
    def transcribe_texts(self, clips, max_new_tokens: int = 64) -> tuple[list[str], list[str]]:
        """(reference texts, the teacher's own greedy transcripts) of `clips` (teacher WER on the
        eval set)."""
        from ark_ray.data.clip_stream import load_clips

        batch = load_clips(clips)
        if self.qwen3 is not None:
            return batch.texts, self.qwen3.transcribe(batch.waves, max_new_tokens)
        from ark_ray.config import SamplingConfig
        from ark_ray.engines.hf import HFEngine

        eng = HFEngine("", model=self.model, processor=self.processor, device=str(self.device),
                       dtype="float32" if self.dtype == torch.float32 else "bfloat16")
        return batch.texts, [t.text for t in eng.transcribe(batch.waves, SamplingConfig(max_new_tokens=max_new_tokens))]
