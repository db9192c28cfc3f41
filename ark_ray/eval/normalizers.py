"""Text normalisers applied to references and predictions before scoring.

Why: WER is only comparable across systems when both sides are normalised the same way. English
uses OpenAI Whisper's EnglishTextNormalizer (the de-facto standard for published English WER; taken
from the `whisper-normalizer` package, which copies Whisper's code without torch). Chinese is
scored by character, so punctuation (CJK and ASCII) and spaces go and traditional characters become
simplified (`zhconv`), else 頭髮/头发 would count as errors. `auto` picks per *reference*, so a
reference and its prediction always go through the same normaliser.

    norm = get_normalizer("auto")
    norm.for_reference("這是測試。")("这是测试")   # ChineseNormalizer -> "这是测试"
"""
from __future__ import annotations

import re
import unicodedata
from typing import Callable, Union

import regex
from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

from ark_ray.config import UserError

# open-audio-opd's CJK test (Han, kana, Hangul: its eval script,
# scripts/eval/eval_jwer_ark_asr_transformers.py, scores such references by CER), applied to the
# raw reference; see metrics.jwer.
CJK_RE = re.compile(r"[\u4e00-\u9fff\u3040-\u30ff\uac00-\ud7af]")

_WS_RE = re.compile(r"\s+")
# Punctuation (P*) and symbols (S*), ASCII and CJK alike (，。、《》【】…％ are all P or S).
_PUNCT_RE = regex.compile(r"[\p{P}\p{S}]+")

# That eval script's own cleanup: a fixed punctuation class and a
# full-width -> ASCII map for digits and a few operators.
_SEED_PUNCT_RE = re.compile(r"""[，。！？、,.!?;:"'（）()【】\[\]<>《》{}…—\-~·`@#$%^&*_+=|\\/]""")
_SEED_FULLWIDTH = str.maketrans({**{chr(0xFF10 + i): str(i) for i in range(10)},
                                 "％": "%", "．": ".", "－": "-", "＋": "+", "＝": "=", "：": ":", "／": "/"})


class NormalizerError(UserError):
    """An unknown normaliser name or a value that is not a normaliser."""


def has_cjk(text: str) -> bool:
    """True if `text` holds a Han, kana or Hangul character (open-audio-opd's J/WER switch)."""
    return bool(CJK_RE.search(text))


class TextNormalizer:
    """Base: `norm(text) -> text`; `for_reference(ref)` picks the normaliser for one pair."""

    name = "none"

    def __call__(self, text: str) -> str:
        return _WS_RE.sub(" ", text).strip()

    def for_reference(self, reference: str) -> "TextNormalizer":
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EnglishNormalizer(TextNormalizer):
    """Whisper's English normaliser: lower-case, [..]/(..) spans and fillers removed, "mr" ->
    "mister", contractions expanded, British -> American spelling, number words -> digits,
    punctuation removed."""

    name = "english"

    def __init__(self) -> None:
        self._whisper = EnglishTextNormalizer()

    def __call__(self, text: str) -> str:
        return self._whisper(text).strip()


class BasicNormalizer(TextNormalizer):
    """Whisper's basic (multilingual) normaliser: lower-case, [..]/(..) spans removed, marks,
    symbols and punctuation -> space (after NFKC, so full-width forms become ASCII).

    `remove_diacritics=True` also folds é -> e (Whisper's default is to keep them)."""

    name = "basic"

    def __init__(self, remove_diacritics: bool = False) -> None:
        self._whisper = BasicTextNormalizer(remove_diacritics=remove_diacritics)

    def __call__(self, text: str) -> str:
        return self._whisper(text).strip()


class ChineseNormalizer(TextNormalizer):
    """For CER on Chinese: NFKC (full-width -> ASCII), traditional -> simplified, lower-case,
    punctuation/symbols and all whitespace removed."""

    name = "chinese"

    def __init__(self) -> None:
        import zhconv  # imported here: it costs ~1 s at import (pkg_resources)

        self._convert = zhconv.convert

    def __call__(self, text: str) -> str:
        text = self._convert(unicodedata.normalize("NFKC", text), "zh-cn").lower()
        return _WS_RE.sub("", _PUNCT_RE.sub("", text))


class SeedNormalizer(TextNormalizer):
    """open-audio-opd's eval-script cleanup, for reproducing its numbers: full-width
    digits/operators -> ASCII, lower-case, its punctuation class removed, whitespace collapsed.
    (That script also ran a private `text_process` normaliser first; without it, it fell back to
    identity, as this does.)"""

    name = "seed"

    def __call__(self, text: str) -> str:
        text = text.translate(_SEED_FULLWIDTH).strip().lower()
        return _WS_RE.sub(" ", _SEED_PUNCT_RE.sub("", text)).strip()


class AutoNormalizer(TextNormalizer):
    """Chinese normaliser for pairs whose reference has CJK characters, English otherwise."""

    name = "auto"

    def __init__(self, cjk: TextNormalizer | None = None, other: TextNormalizer | None = None) -> None:
        self.cjk = cjk or ChineseNormalizer()
        self.other = other or EnglishNormalizer()

    def for_reference(self, reference: str) -> TextNormalizer:
        return self.cjk if has_cjk(reference) else self.other

    def __call__(self, text: str) -> str:
        return self.for_reference(text)(text)


class _Wrapped(TextNormalizer):
    """A plain `str -> str` callable used as a normaliser."""

    def __init__(self, fn: Callable[[str], str]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, text: str) -> str:
        out = self.fn(text)
        if not isinstance(out, str):
            raise NormalizerError(f"normaliser {self.name!r} returned {type(out).__name__}, not str")
        return out


NORMALIZERS: dict[str, Callable[[], TextNormalizer]] = {
    "auto": AutoNormalizer,
    "english": EnglishNormalizer,
    "basic": BasicNormalizer,
    "chinese": ChineseNormalizer,
    "seed": SeedNormalizer,
    "none": TextNormalizer,
}

NormalizerLike = Union[str, TextNormalizer, Callable[[str], str], None]


def get_normalizer(spec: NormalizerLike = "auto") -> TextNormalizer:
    """A normaliser from a name in NORMALIZERS, an instance, a plain callable, or None ("none")."""
    if spec is None:
        return TextNormalizer()
    if isinstance(spec, TextNormalizer):
        return spec
    if isinstance(spec, str):
        try:
            return NORMALIZERS[spec.lower()]()
        except KeyError:
            raise NormalizerError(
                f"unknown normaliser {spec!r}; choose one of {sorted(NORMALIZERS)}") from None
    if callable(spec):
        return _Wrapped(spec)
    raise NormalizerError(f"not a normaliser: {spec!r}")
