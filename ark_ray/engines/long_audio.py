"""Long audio in every engine: cut by the shared chunker, transcribe the pieces, join them back.

Both engines call these two functions, so a 45 s clip is split at the same low-energy points
(and gives the same segment offsets) in batch jobs, rollouts and the HTTP endpoint.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ark_ray.audio import SAMPLE_RATE, AudioChunk, chunk_audio
from ark_ray.engines.transcript import Segment, Transcript


def split_long_audio(audios: Sequence[np.ndarray], max_chunk_s: float
                     ) -> tuple[list[AudioChunk], list[int]]:
    """Flatten clips into pieces of at most `max_chunk_s`; `owners[j]` is piece j's clip index."""
    pieces: list[AudioChunk] = []
    owners: list[int] = []
    for i, wave in enumerate(audios):
        wave = np.asarray(wave, dtype=np.float32)
        if len(wave) <= max_chunk_s * SAMPLE_RATE:
            pieces.append(AudioChunk(0.0, len(wave) / SAMPLE_RATE, wave))
        else:
            pieces.extend(chunk_audio(wave, max_chunk_s=max_chunk_s))
        owners.extend([i] * (len(pieces) - len(owners)))
    return pieces, owners


def _cat(arrays: list, dtype) -> np.ndarray | None:
    arrays = [a for a in arrays if a is not None]
    return np.concatenate(arrays, axis=0).astype(dtype) if arrays else None


def join_chunks(audios: Sequence[np.ndarray], pieces: list[AudioChunk], owners: list[int],
                results: list[list[dict]], n: int, processor) -> list[Transcript]:
    """Per-piece sample dicts -> one Transcript per (clip, sample), clip-major.

    A piece's EOS is dropped when another piece follows, so the joined token stream reads as
    one transcript that ends with a single EOS.
    """
    eos = processor.token_ids.eos
    out: list[Transcript] = []
    for clip, wave in enumerate(audios):
        js = [j for j, o in enumerate(owners) if o == clip]
        for s in range(n):
            parts = [results[j][s] for j in js]
            token_ids: list[int] = []
            lps, tk_ids, tk_lps, segments = [], [], [], []
            timings: dict[str, float] = {}
            for pos, (j, part) in enumerate(zip(js, parts)):
                ids = list(part["token_ids"])
                keep = len(ids)
                if pos < len(parts) - 1 and ids and ids[-1] == eos:
                    keep -= 1
                token_ids += ids[:keep]
                lps.append(None if part.get("token_logprobs") is None else part["token_logprobs"][:keep])
                tk_ids.append(None if part.get("topk_ids") is None else part["topk_ids"][:keep])
                tk_lps.append(None if part.get("topk_logprobs") is None else part["topk_logprobs"][:keep])
                seg_text, _ = processor.decode(ids)
                segments.append(Segment(pieces[j].start_s, pieces[j].end_s, seg_text, ids))
                for k, v in part.get("timings", {}).items():
                    timings[k] = timings.get(k, 0.0) + v
            text, raw = processor.decode(token_ids)
            out.append(Transcript(
                clip_index=clip, sample_index=s, token_ids=token_ids, text=text, text_raw=raw,
                prompt_ids=list(parts[0].get("prompt_ids", [])) if parts else [],
                token_logprobs=_cat(lps, np.float32), topk_ids=_cat(tk_ids, np.int64),
                topk_logprobs=_cat(tk_lps, np.float32), segments=segments,
                duration_s=len(wave) / SAMPLE_RATE, timings=timings,
            ))
    return out
