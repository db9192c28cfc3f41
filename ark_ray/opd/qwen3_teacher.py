"""Qwen3-ASR as the OPD teacher, scored on vLLM or HF transformers.

Qwen3-ASR is the production teacher of open-audio-opd's OPD training script (AutoArk/open-audio-opd
`scripts/train/train_ark_asr_opd_fsdp2_resume.py`: student rollout, teacher forcing and the
FSDP2 update in series on every GPU; docs/architecture.md, "The reference"). The teacher reads
that script's prompt: Qwen3-ASR's chat template with an empty system turn and the audio, then
`language {Language}<asr_text>`, then the student's response forced through the explicit
vocabulary map (`ark_ray.opd.vocab_map`): position t of the response is the teacher's prediction
of student token t, and the student keeps its own rollout ids.

Both engines load the checkpoint directory in transformers' `-hf` layout (`Qwen/Qwen3-ASR-1.7B-hf`;
no hub access at run time). Log-mel features are computed once per clip by the checkpoint's own
`Qwen3ASRFeatureExtractor` and handed to *both* engines (vLLM takes them as precomputed audio
features), so both see identical inputs whatever vLLM version's audio processor would have done.
* vLLM (`engine="vllm"`): teacher forcing through `prompt_logprobs`: the prompt is prompt + forced
  response, vLLM returns the top `logprobs_k` log-probs and the forced token's at each position.
  Requests go in one call ordered by duration (vLLM batches them). Log-probs are vLLM's raw ones
  (temperature 1), so tau must be 1.
* HF (`engine="hf"`, the fallback): one padded forward per duration-sorted group of `max_batch`
  clips; lm_head runs only at the scored positions (the vocabulary is 151936 wide).

Language: the manifest row's `language` (code or name) when it has one, else a guess from the
student's transcript by script (that script's heuristic, shortened: kana -> Japanese, Hangul -> Korean,
Han -> Chinese or Cantonese, Cyrillic, Arabic, Thai, Greek, Devanagari; Latin text -> the configured
fallback, else English).
"""
from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import numpy as np

from ark_ray.eval.language import guess_language, language_name

ASR_TEXT = "<asr_text>"


def audio_token_count(frames: int) -> int:
    """Encoder output frames for `frames` mel frames (Qwen3-ASR's chunked conv stack, 100-frame chunks)."""
    leave = frames % 100
    feat = (leave - 1) // 2 + 1
    return int(((feat - 1) // 2 + 1 - 1) // 2 + 1 + (frames // 100) * 13)


class Qwen3AsrTeacher:
    """Scores student trajectories with a Qwen3-ASR checkpoint; see the module docstring."""

    def __init__(self, teacher_dir: str, student_tok, student_allowed: np.ndarray, topk: int, tau: float = 1.0,
                 engine: str = "hf", device: str = "auto", dtype: str = "auto", max_batch: int = 16,
                 logprobs_k: int = 0, language: Optional[str] = None, languages: Optional[dict] = None,
                 engine_opts: Optional[dict] = None, gpu_gate: Optional[list] = None):
        import torch
        from transformers import AutoProcessor

        from ark_ray.opd.vocab_map import VocabMap

        if engine not in ("hf", "vllm"):
            raise ValueError(f"teacher engine must be 'hf' or 'vllm', got {engine!r}")
        if engine == "vllm" and abs(tau - 1.0) > 1e-12:
            raise ValueError(f"the vLLM teacher returns log-probs at temperature 1, but tau={tau}: "
                             "use teacher_engine.backend=hf for another distillation temperature")
        self.engine, self.topk, self.tau, self.max_batch = engine, topk, float(tau), max_batch
        self.logprobs_k = max(topk, logprobs_k or 2 * topk)
        self.language, self.languages = language, dict(languages or {})
        self.processor = AutoProcessor.from_pretrained(teacher_dir)
        self.tok = self.processor.tokenizer
        self.fe = self.processor.feature_extractor
        self.audio_id = self.tok.convert_tokens_to_ids(self.processor.audio_token)
        on_gpu = torch.cuda.is_available() and device != "cpu"
        self.device = torch.device("cuda" if on_gpu and device == "auto" else ("cpu" if device == "auto" else device))
        self.dtype = (torch.bfloat16 if self.device.type == "cuda" else torch.float32) if dtype == "auto" \
            else getattr(torch, dtype)
        self.teacher_dir = teacher_dir
        self._prompt_cache: dict[str, list[int]] = {}
        self.model = self.llm = None
        if engine == "hf":
            from transformers import Qwen3ASRForConditionalGeneration
            model = Qwen3ASRForConditionalGeneration.from_pretrained(teacher_dir, dtype=self.dtype).eval()
            vocab = model.config.text_config.vocab_size
            if gpu_gate:
                import ray
                ray.get(gpu_gate[0])
            self.model = model.to(self.device)
        else:
            if gpu_gate:
                import ray
                ray.get(gpu_gate[0])
            self.llm = self._make_llm(dict(engine_opts or {}))
            vocab = self.llm.llm_engine.model_config.get_vocab_size()
        self.vmap = VocabMap(student_tok, self.tok, student_allowed, teacher_size=vocab)

    # ------------------------------------------------------------------ set-up
    def _make_llm(self, opts: dict):
        import torch
        from vllm import LLM

        from ark_ray.vllm_plugin.engine_args import supported

        on_gpu = torch.cuda.is_available()
        kw = dict(model=self.teacher_dir, dtype=str(self.dtype).replace("torch.", ""),
                  max_model_len=int(opts.get("max_model_len", 1024)), max_num_seqs=int(opts.get("max_num_seqs", 64)),
                  enforce_eager=bool(opts.get("enforce_eager", False)) or not on_gpu,
                  limit_mm_per_prompt={"audio": 1}, max_logprobs=self.logprobs_k, enable_prefix_caching=False,
                  enable_mm_embeds=True, mm_processor_cache_gb=0, seed=0)
        if opts.get("max_num_batched_tokens"):
            kw["max_num_batched_tokens"] = int(opts["max_num_batched_tokens"])
        if on_gpu:
            kw["gpu_memory_utilization"] = float(opts.get("gpu_memory_utilization", 0.3))
            os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        else:  # a sized KV cache, not a share of the node (engines/cpu_memory.py)
            from ark_ray.config import EngineConfig
            from ark_ray.engines.cpu_memory import cpu_kv_kwargs
            kw.update(cpu_kv_kwargs(self.teacher_dir, kw["max_num_seqs"], kw["max_model_len"], kw["dtype"],
                                    EngineConfig.cpu_kv_cache_max_gb))
        return LLM(**supported(kw))

    def prompt_ids(self, language: str) -> list[int]:
        """The training script's teacher prompt (chat template, empty system turn, audio,
        `language X<asr_text>`) with one audio placeholder (expanded to the clip's frames by
        `expand`)."""
        if language not in self._prompt_cache:
            text = self.processor.apply_chat_template(
                [{"role": "system", "content": ""}, {"role": "user", "content": [{"type": "audio", "audio": ""}]}],
                add_generation_prompt=True, tokenize=False)
            ids = self.tok(text + f"language {language}{ASR_TEXT}", add_special_tokens=False)["input_ids"]
            if ids.count(self.audio_id) != 1:
                raise ValueError(f"the teacher prompt has {ids.count(self.audio_id)} audio placeholders, expected 1")
            self._prompt_cache[language] = ids
        return self._prompt_cache[language]

    def expand(self, ids: list[int], n_audio: int) -> list[int]:
        i = ids.index(self.audio_id)
        return ids[:i] + [self.audio_id] * n_audio + ids[i + 1:]

    def features(self, waves: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Log-mel [128, frames] per clip, each clip on its own (no batch padding in its features)."""
        from ark_ray.audio import SAMPLE_RATE

        out = []
        for w in waves:
            f = self.fe(np.asarray(w, np.float32), sampling_rate=SAMPLE_RATE, padding="longest",
                        return_attention_mask=True, return_tensors="np")
            n = int(f["attention_mask"][0].sum())
            out.append(np.ascontiguousarray(f["input_features"][0, :, :n], dtype=np.float32))
        return out

    def row_language(self, sample_id: str, text: str) -> str:
        return language_name(self.languages.get(sample_id)) or guess_language(text, self.language)

    # ------------------------------------------------------------------ scoring
    def score_batch(self, batch, waves: Sequence[np.ndarray]):
        """A TrajectoryBatch's union ids [B, T, 2k], teacher log-probs [B, T, 2k], tail [B, T] and
        scored mask [B, T] (False: padding, or a student token with no teacher token)."""
        from ark_ray.opd.vocab_map import student_buckets

        b, t_max = batch.response_ids.shape
        k = self.topk
        union = np.full((b, t_max, 2 * k), -1, np.int32)
        logp = np.full((b, t_max, 2 * k), -np.inf, np.float32)
        tail = np.zeros((b, t_max), np.float32)
        scored = np.zeros((b, t_max), bool)
        feats = self.features(waves)
        prompts, forced, positions, stud = [], [], [], []
        for i in range(b):
            resp = batch.response_ids[i][batch.response_mask[i]].tolist()
            ids, off, ok = self.vmap.force(resp)
            text = batch.pred_text[i] or batch.reference_text[i]
            prompts.append(self.prompt_ids(self.row_language(str(batch.sample_id[i]), str(text))))
            forced.append(ids)
            scored[i, : len(resp)] = ok
            positions.append(off[ok])
            stud.append(batch.student_topk_ids[i, : len(resp)][ok])
        known_ids, known_lp = self.score_rows(feats, prompts, forced, positions, stud)
        for i in range(b):
            cols = np.flatnonzero(scored[i])
            if len(cols):
                union[i, cols], logp[i, cols], tail[i, cols] = student_buckets(known_ids[i], known_lp[i], k,
                                                                              stud[i], self.vmap)
        return union, logp, tail, scored

    def score_rows(self, feats: list[np.ndarray], prompts: list[list[int]], forced: list[list[int]],
                   positions: list[np.ndarray], student_ids: list[np.ndarray]) -> tuple[list, list]:
        """Per row: (known teacher ids [n, W], their log-probs [n, W]) at `positions` (indices into
        `forced`, each the forced token whose prediction is read). The first `topk` columns are the
        teacher's top-k; the others are further known ids (HF: the student's top-k ids, mapped)."""
        order = np.argsort([f.shape[1] for f in feats], kind="stable")   # duration groups
        if self.engine == "vllm":
            return self._score_vllm(feats, prompts, forced, positions, order)
        ids_out, lp_out = [None] * len(feats), [None] * len(feats)
        for s in range(0, len(order), self.max_batch):
            rows = list(order[s:s + self.max_batch])
            got = self._score_hf([feats[i] for i in rows], [prompts[i] for i in rows], [forced[i] for i in rows],
                                 [positions[i] for i in rows], [student_ids[i] for i in rows])
            for i, (a, b) in zip(rows, got):
                ids_out[i], lp_out[i] = a, b
        return ids_out, lp_out

    def _score_hf(self, feats, prompts, forced, positions, student_ids):
        import torch

        b = len(feats)
        seqs = [self.expand(p, audio_token_count(f.shape[1])) + list(x) for p, f, x in zip(prompts, feats, forced)]
        width = max(map(len, seqs))
        ids = torch.full((b, width), self.tok.pad_token_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
            att[j, : len(s)] = 1
        frames = max(-(-f.shape[1] // 100) * 100 for f in feats)   # zero-padded to whole 100-frame chunks
        mel = torch.zeros((b, feats[0].shape[0], frames))
        fmask = torch.zeros((b, frames), dtype=torch.long)
        for j, f in enumerate(feats):
            mel[j, :, : f.shape[1]] = torch.from_numpy(f)
            fmask[j, : f.shape[1]] = 1
        dev = self.device
        with torch.inference_mode():
            hidden = self.model.model(input_ids=ids.to(dev), attention_mask=att.to(dev),
                                      input_features=mel.to(dev, self.dtype),
                                      input_features_mask=fmask.to(dev)).last_hidden_state
            out = []
            for j in range(b):
                start = len(seqs[j]) - len(forced[j])
                pos = torch.as_tensor(start - 1 + np.asarray(positions[j], np.int64), device=dev)
                lg = self.model.lm_head(hidden[j, pos]).float() / self.tau
                lp = torch.log_softmax(lg, dim=-1)
                top_lp, top_id = lp.topk(self.topk, dim=-1)
                st = torch.as_tensor(np.asarray(student_ids[j], np.int64))
                extra = torch.as_tensor(np.where(st >= 0, self.vmap.s2t[np.clip(st.numpy(), 0, len(self.vmap.s2t) - 1)],
                                                 -1), device=dev)
                extra_lp = lp.gather(-1, extra.clamp(min=0)).masked_fill(extra < 0, float("-inf"))
                out.append((torch.cat([top_id, extra], -1).cpu().numpy(), torch.cat([top_lp, extra_lp], -1).cpu().numpy()))
        return out

    def _score_vllm(self, feats, prompts, forced, positions, order):
        import torch
        from vllm import SamplingParams

        from ark_ray.vllm_plugin.outputs import logprob_kwargs

        sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=self.logprobs_k, detokenize=False,
                            skip_special_tokens=False, **logprob_kwargs())
        reqs = []
        for i in order:
            f = torch.from_numpy(feats[i])
            n = f.shape[1]
            reqs.append({"prompt_token_ids": list(prompts[i]) + list(forced[i]),
                         "multi_modal_data": {"audio": {"input_audio_features": f,
                                                        "audio_feature_lengths": torch.tensor([n]),
                                                        "feature_attention_mask": torch.ones((1, n), dtype=torch.long)}}})
        outs = self.llm.generate(reqs, sp, use_tqdm=False)
        ids_out, lp_out = [None] * len(feats), [None] * len(feats)
        for i, o in zip(order, outs):
            start = len(o.prompt_token_ids) - len(forced[i])   # the audio placeholder is expanded here
            ids_out[i], lp_out[i] = _prompt_topk(o.prompt_logprobs, start + np.asarray(positions[i], np.int64),
                                                 self.logprobs_k)
        return ids_out, lp_out

    # ------------------------------------------------------------------ the teacher's own transcripts
    def transcribe(self, waves: Sequence[np.ndarray], max_new_tokens: int = 64) -> list[str]:
        """Greedy transcripts (teacher WER), the language left to the model as in plain Qwen3-ASR use."""
        import torch

        feats = self.features(waves)
        text = self.processor.apply_chat_template(
            [{"role": "system", "content": ""}, {"role": "user", "content": [{"type": "audio", "audio": ""}]}],
            add_generation_prompt=True, tokenize=False)
        base = self.tok(text, add_special_tokens=False)["input_ids"]
        stop = [self.tok.eos_token_id]
        outs = []
        if self.llm is not None:
            from vllm import SamplingParams
            sp = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stop, skip_special_tokens=True)
            reqs = [{"prompt_token_ids": base, "multi_modal_data": {"audio": {
                "input_audio_features": torch.from_numpy(f), "audio_feature_lengths": torch.tensor([f.shape[1]]),
                "feature_attention_mask": torch.ones((1, f.shape[1]), dtype=torch.long)}}} for f in feats]
            outs = [self.tok.decode(o.outputs[0].token_ids, skip_special_tokens=False) for o in
                    self.llm.generate(reqs, sp, use_tqdm=False)]
        else:
            for f in feats:
                ids = torch.tensor([self.expand(base, audio_token_count(f.shape[1]))], device=self.device)
                frames = -(-f.shape[1] // 100) * 100
                mel = torch.zeros((1, f.shape[0], frames))
                mel[0, :, : f.shape[1]] = torch.from_numpy(f)
                fm = torch.zeros((1, frames), dtype=torch.long)
                fm[0, : f.shape[1]] = 1
                with torch.inference_mode():
                    g = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                            input_features=mel.to(self.device, self.dtype),
                                            input_features_mask=fm.to(self.device), max_new_tokens=max_new_tokens,
                                            do_sample=False, eos_token_id=stop, pad_token_id=self.tok.pad_token_id)
                outs.append(self.tok.decode(g[0, ids.shape[1]:], skip_special_tokens=False))
        return [_clean(t, self.tok) for t in outs]


def _clean(text: str, tok) -> str:
    text = text.split(ASR_TEXT, 1)[-1]
    for s in tok.all_special_tokens:
        text = text.replace(s, "")
    return text.strip()


def _prompt_topk(plp, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """vLLM prompt log-probs at `positions` -> (ids [n, k + 1], log-probs [n, k + 1]): the top-k by
    rank, then the forced token when it is outside them (else -1 / -inf)."""
    n = len(positions)
    ids = np.full((n, k + 1), -1, np.int64)
    lps = np.full((n, k + 1), -np.inf, np.float32)
    starts = getattr(plp, "start_indices", None)
    for r, p in enumerate(positions):
        p = int(p)
        if starts is not None:
            s, e = plp.start_indices[p], plp.end_indices[p]
            items = zip(plp.token_ids[s:e], plp.logprobs[s:e], plp.ranks[s:e])
        else:
            items = ((t, v.logprob, v.rank) for t, v in (plp[p] or {}).items())
        seen = set()
        extra = None
        for t, lp, rank in sorted(items, key=lambda x: (x[2] if x[2] is not None else 1 << 30)):
            if t in seen:
                continue
            seen.add(t)
            if rank is not None and 1 <= rank <= k:
                ids[r, rank - 1], lps[r, rank - 1] = t, lp
            elif extra is None:
                extra = (t, lp)
        if extra is not None:
            ids[r, k], lps[r, k] = extra
    return ids, lps
