"""WER, CER and open-audio-opd's mixed J/WER, as edit *counts* so shards and files combine exactly.

The J/WER is that of open-audio-opd's eval script (scripts/eval/eval_jwer_ark_asr_transformers.py:
normalise, strip punctuation, then CER for references with CJK/kana/Hangul and WER for the rest).

Corpus-level rates: total edits / total reference units (not a mean of per-utterance rates), so
`wer_counts(a) + wer_counts(b) == wer_counts(a + b)` and a job can score shards in parallel.
Edits come from jiwer's alignment (substitutions, deletions, insertions).

- WER: whitespace-separated words.
- CER: characters with all whitespace removed on both sides (that script's intent; its jiwer path
  mixed a with-spaces edit count with a without-spaces length, which this does not copy).
- J/WER (that script's "Final WER"): per utterance, CER if the *raw* reference holds CJK/kana/Hangul
  characters, else WER; edits and units are summed across utterances.

Utterances whose reference is empty after normalisation are left out of every rate (as in that script:
there is nothing to divide by) and counted in `empty_refs`; what was hypothesised for them is in
`empty_ref_insertions` (hallucination on silence), reported but outside the rate. Text is scored
as given unless a `normalizer` is passed (a name from `normalizers.NORMALIZERS`, an instance or a callable).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence, Union

import jiwer

from ark_ray.config import UserError
from ark_ray.eval.normalizers import NormalizerLike, TextNormalizer, get_normalizer, has_cjk


class EvalError(UserError):
    """Inputs that cannot be scored: mismatched lengths, non-string texts, unreadable predictions."""


@dataclass(frozen=True)
class ErrorCounts:
    """Edit counts over some utterances; `+` combines shards, `.rate` is the corpus error rate."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    ref_len: int = 0          # reference units (words or characters) of the scored utterances
    utterances: int = 0       # utterances scored (non-empty reference)
    empty_refs: int = 0       # utterances left out: reference empty after normalisation
    empty_ref_insertions: int = 0  # units hypothesised for those (reported, not in the rate)

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        """errors / ref_len; NaN when nothing was scored."""
        return self.errors / self.ref_len if self.ref_len else math.nan

    def __add__(self, other: "ErrorCounts") -> "ErrorCounts":
        if not isinstance(other, ErrorCounts):
            return NotImplemented
        return ErrorCounts(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def __radd__(self, other):  # sum([...]) starts from 0
        return self if other == 0 else self.__add__(other)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "errors": self.errors,
                "rate": None if math.isnan(self.rate) else self.rate}

    @classmethod
    def from_dict(cls, d: dict) -> "ErrorCounts":
        return cls(**{f.name: int(d.get(f.name, 0)) for f in dataclasses.fields(cls)})


def _counts(out, ref_len: int) -> ErrorCounts:
    return ErrorCounts(out.substitutions, out.deletions, out.insertions, ref_len, utterances=1)


def word_counts(ref: str, hyp: str) -> ErrorCounts:
    """Word edits of one utterance (text as given, split on whitespace)."""
    ref_words, hyp_words = ref.split(), hyp.split()
    if not ref_words:
        return ErrorCounts(empty_refs=1, empty_ref_insertions=len(hyp_words))
    if not hyp_words:
        return ErrorCounts(deletions=len(ref_words), ref_len=len(ref_words), utterances=1)
    return _counts(jiwer.process_words(" ".join(ref_words), " ".join(hyp_words)), len(ref_words))


def char_counts(ref: str, hyp: str) -> ErrorCounts:
    """Character edits of one utterance, whitespace removed from both sides."""
    ref_chars, hyp_chars = "".join(ref.split()), "".join(hyp.split())
    if not ref_chars:
        return ErrorCounts(empty_refs=1, empty_ref_insertions=len(hyp_chars))
    if not hyp_chars:
        return ErrorCounts(deletions=len(ref_chars), ref_len=len(ref_chars), utterances=1)
    return _counts(jiwer.process_characters(ref_chars, hyp_chars), len(ref_chars))


@dataclass(frozen=True)
class UtteranceScore:
    """One reference/prediction pair after normalisation, with its word and character edits."""

    ref_clean: str
    hyp_clean: str
    cjk: bool                 # raw reference has CJK characters: J/WER uses its CER
    words: ErrorCounts
    chars: ErrorCounts

    @property
    def mixed(self) -> ErrorCounts:
        """This utterance's J/WER contribution."""
        return self.chars if self.cjk else self.words


def score_utterance(ref: str, hyp: str, normalizer: NormalizerLike = None) -> UtteranceScore:
    """Normalise one pair (the normaliser chosen by the reference) and count its edits."""
    norm = get_normalizer(normalizer)
    return _score(ref, hyp, norm)


def _score(ref: str, hyp: str, norm: TextNormalizer) -> UtteranceScore:
    pair = norm.for_reference(ref)
    r, h = pair(ref), pair(hyp)
    return UtteranceScore(r, h, has_cjk(ref), word_counts(r, h), char_counts(r, h))


@dataclass(frozen=True)
class Scores:
    """WER, CER and J/WER counts of a set of utterances; `+` combines them."""

    wer: ErrorCounts = field(default_factory=ErrorCounts)
    cer: ErrorCounts = field(default_factory=ErrorCounts)
    jwer: ErrorCounts = field(default_factory=ErrorCounts)

    def __add__(self, other: "Scores") -> "Scores":
        if not isinstance(other, Scores):
            return NotImplemented
        return Scores(self.wer + other.wer, self.cer + other.cer, self.jwer + other.jwer)

    def __radd__(self, other):
        return self if other == 0 else self.__add__(other)

    @classmethod
    def from_utterances(cls, utts: Iterable[UtteranceScore]) -> "Scores":
        total = cls()
        for u in utts:
            total = total + cls(u.words, u.chars, u.mixed)
        return total

    def to_dict(self) -> dict:
        return {"wer": self.wer.to_dict(), "cer": self.cer.to_dict(), "jwer": self.jwer.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Scores":
        return cls(*(ErrorCounts.from_dict(d[k]) for k in ("wer", "cer", "jwer")))


Texts = Union[str, Sequence[str]]


def _pairs(refs: Texts, hyps: Texts) -> list[tuple[str, str]]:
    refs = [refs] if isinstance(refs, str) else list(refs)
    hyps = [hyps] if isinstance(hyps, str) else list(hyps)
    if len(refs) != len(hyps):
        raise EvalError(f"{len(refs)} references but {len(hyps)} hypotheses")
    for i, (r, h) in enumerate(zip(refs, hyps)):
        if not isinstance(r, str) or not isinstance(h, str):
            raise EvalError(f"pair {i}: reference and hypothesis must be str, got "
                            f"{type(r).__name__} and {type(h).__name__}")
    return list(zip(refs, hyps))


def score_texts(refs: Texts, hyps: Texts, normalizer: NormalizerLike = None) -> list[UtteranceScore]:
    """Per-utterance scores of parallel reference/hypothesis lists."""
    norm = get_normalizer(normalizer)
    return [_score(r, h, norm) for r, h in _pairs(refs, hyps)]


def score(refs: Texts, hyps: Texts, normalizer: NormalizerLike = None) -> Scores:
    """WER, CER and J/WER counts of parallel lists (one pass of normalisation)."""
    return Scores.from_utterances(score_texts(refs, hyps, normalizer))


def wer_counts(refs: Texts, hyps: Texts, *, normalizer: NormalizerLike = None) -> ErrorCounts:
    return score(refs, hyps, normalizer).wer


def cer_counts(refs: Texts, hyps: Texts, *, normalizer: NormalizerLike = None) -> ErrorCounts:
    return score(refs, hyps, normalizer).cer


def jwer_counts(refs: Texts, hyps: Texts, *, normalizer: NormalizerLike = None) -> ErrorCounts:
    return score(refs, hyps, normalizer).jwer


def wer(refs: Texts, hyps: Texts, *, normalizer: NormalizerLike = None) -> float:
    """Corpus word error rate: total word edits / total reference words (NaN if none)."""
    return wer_counts(refs, hyps, normalizer=normalizer).rate


def cer(refs: Texts, hyps: Texts, *, normalizer: NormalizerLike = None) -> float:
    """Corpus character error rate, whitespace ignored (NaN if no reference characters)."""
    return cer_counts(refs, hyps, normalizer=normalizer).rate


def jwer(refs: Texts, hyps: Texts, *, normalizer: NormalizerLike = None) -> float:
    """open-audio-opd's mixed rate: CER for utterances whose raw reference has CJK, WER otherwise."""
    return jwer_counts(refs, hyps, normalizer=normalizer).rate
