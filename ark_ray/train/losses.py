"""The learner's loss interface, and SFT's token cross-entropy.

The job hands `LearnerGroup` a loss object (picklable: it travels to every learner rank). It has
* `tokens(batch) -> int`: the loss tokens in a whole step's batch (numpy, on the driver); the
  learner divides every rank's summed loss by this global count, so micro-batching, accumulation
  and the number of ranks do not change the update;
* `__call__(model, batch) -> (loss_sum, stats)`: on one rank, for one micro-batch of torch tensors
  on its device. `model` is the DeepSpeed engine (call it like the HF model); `loss_sum` is the
  loss summed over the micro-batch's tokens (a scalar attached to the graph), `stats` are floats
  that add up over micro-batches and ranks (sums, never means);
* `summarize(stats, tokens) -> dict`: the step's metrics from the stats summed over all
  micro-batches and ranks; it must return "loss" (per token).
`forward_logits` is the shared forward: it computes logits only on the columns a loss reads, since
a [B, L, 164k] fp32 logits tensor over the whole prompt (mostly audio tokens) is the learner's
largest activation at real dimensions.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class Loss(Protocol):
    def tokens(self, batch: dict[str, np.ndarray]) -> int: ...

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...

    def summarize(self, stats: dict[str, float], tokens: int) -> dict[str, float]: ...


def forward_logits(model, batch: dict[str, torch.Tensor], first: int, last: int) -> torch.Tensor:
    """Logits [B, last - first + 1, V] at sequence positions first..last (inclusive) only."""
    keep = torch.arange(first, last + 1, device=batch["input_ids"].device)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                input_features=batch["input_features"], feature_lengths=batch["feature_lengths"],
                logits_to_keep=keep)
    return out.logits


class TokenCrossEntropy:
    """SFT: next-token cross-entropy on the `labels` (-100 = not trained), summed in float32."""

    def tokens(self, batch: dict[str, np.ndarray]) -> int:
        return int((np.asarray(batch["labels"])[:, 1:] != -100).sum())

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch["labels"]
        cols = (labels[:, 1:] != -100).any(0).nonzero().flatten()
        if len(cols) == 0:   # nothing to train here: a zero that still reaches every parameter's grad hook
            logits = forward_logits(model, batch, 0, 0)
            return logits.float().sum() * 0.0, {"ce_sum": 0.0, "tokens": 0.0}
        lo, hi = int(cols[0]), int(cols[-1])      # logits at position p predict label p + 1
        logits = forward_logits(model, batch, lo, hi).float()
        target = labels[:, lo + 1: hi + 2]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                               ignore_index=-100, reduction="sum")
        return ce, {"ce_sum": float(ce.detach()), "tokens": float((target != -100).sum())}

    def summarize(self, stats: dict[str, float], tokens: int) -> dict[str, float]:
        return {"loss": stats["ce_sum"] / max(1, tokens), "tokens": tokens}
