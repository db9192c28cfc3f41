"""What an engine returns: one `Transcript` per clip and sample, with a `Segment` per window of a
long clip.

Why its own module: the engines' interface (`base`) and the long-audio join (`long_audio`) both
build these; kept apart from both, neither needs the other's import.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class Segment:
    """One chunk of a long clip (the shared chunker's window) and its transcript."""
    start_s: float
    end_s: float
    text: str
    token_ids: list[int]


@dataclass
class Transcript:
    """The result for one clip and one sample (`sample_index` < n)."""
    clip_index: int
    sample_index: int
    token_ids: list[int]                      # generated ids, EOS included when generated
    text: str                                 # pred_text: cleaned
    text_raw: str                             # pred_text_raw: decoded up to EOS
    prompt_ids: list[int] = field(default_factory=list)
    token_logprobs: Optional[np.ndarray] = None   # [T] log-prob of each generated token
    topk_ids: Optional[np.ndarray] = None         # [T, k] int64, when sampling.logprobs_topk > 0
    topk_logprobs: Optional[np.ndarray] = None    # [T, k] float32
    segments: list[Segment] = field(default_factory=list)
    duration_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
