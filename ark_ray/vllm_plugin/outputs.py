"""Per-token log-probs out of vLLM without a Python object per (token, rank).

A rollout asks for the top-32 log-probs at every position. vLLM's default container is one
dict of `Logprob` objects per position (33 objects each: ~1.8 M for 512 clips x 105 tokens),
built in the single-threaded front end and then sorted again per position by the caller. With
`SamplingParams(flat_logprobs=True)` (vLLM 0.26 and 0.32) vLLM keeps flat lists instead; each
position holds [sampled token, top-1 .. top-k] in that order, so the arrays below are
reshapes, not loops. Where flat log-probs are missing, the dict path gives the same arrays.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def logprob_kwargs() -> dict:
    """`{"flat_logprobs": True}` where this vLLM's SamplingParams has it, else `{}`."""
    from vllm import SamplingParams

    try:
        SamplingParams(flat_logprobs=True)
    except TypeError:
        return {}
    return {"flat_logprobs": True}


def token_and_topk(lps, ids: list[int], k: int):
    """(log-prob of each chosen token [T], top-k ids [T, k] or None, top-k log-probs [T, k] or None).

    `lps` is vLLM's sample log-probs for one completion (flat or a list of dicts); rows whose
    position offers fewer than k alternatives are padded with id -1 / -inf.
    """
    n = len(ids)
    starts = getattr(lps, "start_indices", None)
    if starts is not None and n and len(starts) >= n:
        width = np.asarray(lps.end_indices[:n]) - np.asarray(starts[:n])
        # fast path when every position holds [chosen, top-1 .. top-w-1] with w - 1 >= k
        if (width == width[0]).all() and width[0] - 1 >= k and width[0] >= 1 and starts[0] == 0:
            w = int(width[0])
            flat_ids = np.asarray(lps.token_ids[: n * w], dtype=np.int64).reshape(n, w)
            flat_lp = np.asarray(lps.logprobs[: n * w], dtype=np.float32).reshape(n, w)
            if (flat_ids[:, 0] == np.asarray(ids)).all():
                tok = flat_lp[:, 0].copy()
                if k <= 0:
                    return tok, None, None
                return tok, flat_ids[:, 1:1 + k].copy(), flat_lp[:, 1:1 + k].copy()
    # dict per position (or a flat container of another shape): the general path
    tok = np.asarray([lp[t].logprob for lp, t in zip(lps, ids)], np.float32)
    if k <= 0:
        return tok, None, None
    tk_ids = np.full((n, k), -1, np.int64)
    tk_lp = np.full((n, k), -np.inf, np.float32)
    for j, lp in enumerate(lps):
        if j >= n:
            break
        ranked = sorted(lp.items(), key=lambda kv: -kv[1].logprob)[:k]
        for r, (tid, v) in enumerate(ranked):
            tk_ids[j, r], tk_lp[j, r] = tid, v.logprob
    return tok, tk_ids, tk_lp
