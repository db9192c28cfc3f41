"""The one interface every job uses to run ARK-ASR: audio in, tokens + text (+ top-k) out.

Rollouts (OPD), batch transcription and serving all go through `Transcriber`, so sampling,
the allowed-token mask, long-audio chunking and output cleanup behave the same everywhere.
`VllmEngine` is the default; `HFEngine` is the reference and the fallback.
"""
from __future__ import annotations

import abc
from typing import AsyncIterator, Iterable, Mapping, Optional, Sequence

import numpy as np

from ark_ray.config import SamplingConfig
from ark_ray.engines.long_audio import join_chunks, split_long_audio
from ark_ray.engines.transcript import Segment, Transcript

__all__ = ["Transcriber", "AsyncTranscriber", "Transcript", "Segment"]


def piece_seeds(seeds: Optional[Sequence[int]], owners: Sequence[int]) -> Optional[list[int]]:
    """Per-clip seeds -> one seed per piece of the long-audio split (`owners[j]`: piece j's clip):
    a clip's k-th piece gets its clip's seed + k."""
    if seeds is None:
        return None
    out, seen = [], {}
    for o in owners:
        k = seen.get(o, 0)
        seen[o] = k + 1
        out.append((int(seeds[o]) + k) % 2**63)
    return out


def mix_seeds(*parts: int) -> int:
    """One 32-bit seed from integers (a run's seed and a data position; a batch's seeds): stable
    across processes and runs, unlike hash()."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1, np.uint32)[0])


class Transcriber(abc.ABC):
    """Audio (16 kHz mono float32 arrays) in, one `Transcript` per clip and sample out."""

    #: the shared ArkAsrProcessor (prompt ids, features, token mask, cleanup)
    processor: object

    @abc.abstractmethod
    def transcribe(self, audios: Sequence[np.ndarray], sampling: Optional[SamplingConfig] = None,
                   seeds: Optional[Sequence[int]] = None) -> list[Transcript]:
        """Transcribe clips; returns len(audios) * sampling.n results, clip-major.

        Clips longer than the engine's `max_chunk_s` are cut by `ark_ray.audio.chunk_audio`
        and their chunks' transcripts joined, with one `Segment` per chunk. `seeds`: one sampling
        seed per clip (OPD derives them from its `seed` and the clip's data position), so a clip
        samples the same tokens whenever it is transcribed again with the same weights; they
        override `sampling.seed` and do nothing for greedy decoding.
        """

    @abc.abstractmethod
    def update_weights(self, weights: Mapping[str, "object"] | Iterable[tuple[str, "object"]],
                       bucket_bytes: int = 1 << 30) -> None:
        """Load new weights in place (real checkpoint key names), e.g. after an OPD step. `weights`
        may be a stream; an engine that ships them to other processes sends at most
        `bucket_bytes` per message."""

    def close(self) -> None:
        """Release the engine's memory and processes."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncTranscriber(abc.ABC):
    """The serving side of the engines: one 30 s window per request, awaited (or streamed) on its own.

    Where requests arrive one by one (the Serve replica), each window goes to the engine as soon
    as it arrives and the engine batches continuously; nothing waits for a batch to fill or to
    finish. Windows come from the shared chunker (`split_long_audio`) and results are joined with
    `join_chunks`, and prompts, token mask and cleanup are the shared processor's, so a window
    transcribes exactly as in `Transcriber.transcribe`.

    A window's result is a *sample dict*: {token_ids, prompt_ids, token_logprobs (or None),
    topk_ids/topk_logprobs (when sampling.logprobs_topk > 0), timings}.
    """

    processor: object
    max_chunk_s: float

    @abc.abstractmethod
    async def transcribe_window(self, wave: np.ndarray, sampling: Optional[SamplingConfig] = None, *,
                                logprobs: bool = True) -> list[dict]:
        """One window (<= max_chunk_s) -> `sampling.n` sample dicts."""

    @abc.abstractmethod
    def stream_window(self, wave: np.ndarray, sampling: Optional[SamplingConfig] = None, *,
                      logprobs: bool = True) -> AsyncIterator[dict]:
        """One window, n = 1: yields {"delta": [new token ids]} as the engine decodes them, then
        {"done": sample dict}. The deltas add up to the done dict's token_ids."""

    async def transcribe(self, audios: Sequence[np.ndarray],
                         sampling: Optional[SamplingConfig] = None) -> list[Transcript]:
        """Like `Transcriber.transcribe`: every window of every clip in flight at once."""
        import asyncio

        sampling = sampling or SamplingConfig()
        pieces, owners = split_long_audio(audios, self.max_chunk_s)
        results = await asyncio.gather(*(self.transcribe_window(p.samples, sampling) for p in pieces))
        return join_chunks(audios, pieces, owners, list(results), sampling.n, self.processor)

    def healthy(self) -> bool:
        """False once the engine can no longer answer (its processes died)."""
        return True

    def close(self) -> None:
        """Release the engine's memory and processes."""
