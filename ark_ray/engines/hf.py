"""HFEngine: ARK-ASR through transformers' `generate` (the reference path and the fallback).

It is the ground truth the vLLM engine is tested against, and what runs where vLLM cannot
(unusual hardware, debugging). Batching: clips are sorted by length and run in batches of
`max_batch_size`; the encoder masks padding, so results do not depend on batch composition.
"""
from __future__ import annotations

import time
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from ark_ray.config import SamplingConfig
from ark_ray.engines.base import Transcriber, Transcript, mix_seeds, piece_seeds
from ark_ray.engines.long_audio import split_long_audio, join_chunks


class _AllowedTokens:
    """Logits processor: every id outside the processor's allowed mask gets -inf."""

    def __init__(self, allowed: torch.Tensor):
        self.blocked = ~allowed

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        blocked = self.blocked.to(scores.device)
        n = min(scores.shape[-1], blocked.shape[0])
        scores = scores.clone()
        scores[..., :n] = scores[..., :n].masked_fill(blocked[:n], float("-inf"))
        return scores


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


class HFEngine(Transcriber):
    def __init__(self, model_dir: str, *, device: str = "auto", dtype: str = "auto",
                 max_batch_size: int = 40, max_chunk_s: float = 30.0, model=None, processor=None):
        from ark_ray.model import ArkAsrForConditionalGeneration, ArkAsrProcessor

        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if device == "auto" else device))
        self.dtype = _resolve_dtype(dtype, self.device)
        self.processor = processor or ArkAsrProcessor.from_pretrained(model_dir)
        if model is None:
            model = ArkAsrForConditionalGeneration.from_pretrained(model_dir, dtype=self.dtype)
        self.model = model.to(self.device, self.dtype).eval()
        self.max_batch_size = max_batch_size
        self.max_chunk_s = max_chunk_s
        vocab = self.model.config.get_text_config().vocab_size
        self._mask = _AllowedTokens(self.processor.allowed_token_mask(vocab))

    # ------------------------------------------------------------------ transcription
    @torch.inference_mode()
    def _generate(self, waves: Sequence[np.ndarray], sampling: SamplingConfig,
                  seeds: Optional[list[int]] = None) -> list[list[dict]]:
        """Generate for short clips (<= max_chunk_s). Returns, per clip, n sample dicts. `seeds`: one
        per wave; transformers samples a batch from one generator, so each batch of waves seeds it
        from its waves' seeds (the same waves in the same batches sample the same tokens)."""
        out: list[list[dict]] = [[] for _ in waves]
        order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
        eos = self.processor.token_ids.eos
        for start in range(0, len(order), self.max_batch_size):
            idx = order[start:start + self.max_batch_size]
            t0 = time.perf_counter()
            batch = self.processor([waves[i] for i in idx], padding_side="left")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            batch["input_features"] = batch["input_features"].to(self.dtype)
            t1 = time.perf_counter()
            greedy = sampling.temperature <= 0
            gen_kwargs = dict(
                max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                num_return_sequences=sampling.n, eos_token_id=eos,
                pad_token_id=self.processor.token_ids.pad, logits_processor=[self._mask],
                output_scores=True, return_dict_in_generate=True,
            )
            if not greedy:
                gen_kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
                if seeds is not None:
                    torch.manual_seed(mix_seeds(*(seeds[i] for i in idx)))
                elif sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
            res = self.model.generate(**batch, **gen_kwargs)
            t2 = time.perf_counter()
            prompt_len = batch["input_ids"].shape[1]
            seqs = res.sequences[:, prompt_len:].cpu()
            # processed scores: the masked (and temperature-scaled) logits vLLM's
            # "processed_logprobs" also reports, so top-k ids match between engines.
            logp = torch.stack(res.scores, dim=1).float().log_softmax(-1).cpu()
            for row in range(seqs.shape[0]):
                clip = idx[row // sampling.n]
                ids = seqs[row].tolist()
                n_tok = len(ids)
                if eos in ids:
                    n_tok = ids.index(eos) + 1
                ids = ids[:n_tok]
                lp = logp[row, :n_tok]
                item = {
                    "token_ids": ids,
                    "token_logprobs": lp.gather(-1, torch.tensor(ids).view(-1, 1)).squeeze(-1).numpy(),
                    "prompt_ids": batch["input_ids"][row // sampling.n][
                        batch["attention_mask"][row // sampling.n].bool()].tolist(),
                    "timings": {"featurize_s": t1 - t0, "generate_s": t2 - t1},
                }
                if sampling.logprobs_topk > 0:
                    vals, ids_k = lp.topk(sampling.logprobs_topk, dim=-1)
                    item["topk_ids"] = ids_k.numpy().astype(np.int64)
                    item["topk_logprobs"] = vals.numpy().astype(np.float32)
                out[clip].append(item)
        return out

    def transcribe(self, audios: Sequence[np.ndarray], sampling: Optional[SamplingConfig] = None,
                   seeds: Optional[Sequence[int]] = None) -> list[Transcript]:
        sampling = sampling or SamplingConfig()
        pieces, owners = split_long_audio(audios, self.max_chunk_s)
        results = self._generate([p.samples for p in pieces], sampling, piece_seeds(seeds, owners))
        return join_chunks(audios, pieces, owners, results, sampling.n, self.processor)

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def update_weights(self, weights: Mapping[str, object] | Iterable[tuple[str, object]],
                       bucket_bytes: int = 1 << 30) -> None:   # in-process: no messages to size
        items = weights.items() if isinstance(weights, Mapping) else weights
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        for name, value in items:
            if name == "lm_head.weight" and self.model.config.get_text_config().tie_word_embeddings:
                continue
            if name not in params:
                raise KeyError(f"update_weights: unknown parameter {name!r}")
            params[name].copy_(torch.as_tensor(value).to(params[name].device, params[name].dtype))

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
