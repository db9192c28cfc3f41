"""Evaluation: text normalisers, WER / CER / open-audio-opd's J/WER as combinable edit counts, reports.

    from ark_ray.eval import wer, jwer, score
    wer(["the cat sat"], ["the cat sat down"])                  # 1/3
    jwer(refs, hyps, normalizer="auto")                         # CER for CJK refs, WER otherwise
    s = score(refs_a, hyps_a, "auto") + score(refs_b, hyps_b, "auto")   # shards combine exactly
"""
from ark_ray.eval.metrics import (
    ErrorCounts,
    EvalError,
    Scores,
    UtteranceScore,
    cer,
    cer_counts,
    char_counts,
    jwer,
    jwer_counts,
    score,
    score_texts,
    score_utterance,
    wer,
    wer_counts,
    word_counts,
)
from ark_ray.eval.normalizers import (
    NORMALIZERS,
    AutoNormalizer,
    BasicNormalizer,
    ChineseNormalizer,
    EnglishNormalizer,
    NormalizerError,
    SeedNormalizer,
    TextNormalizer,
    get_normalizer,
    has_cjk,
)
from ark_ray.eval.report import EvalReport, evaluate_rows, format_table, total

__all__ = [
    "ErrorCounts", "EvalError", "Scores", "UtteranceScore", "cer", "cer_counts", "char_counts", "jwer",
    "jwer_counts", "score", "score_texts", "score_utterance", "wer", "wer_counts", "word_counts",
    "NORMALIZERS", "AutoNormalizer", "BasicNormalizer", "ChineseNormalizer", "EnglishNormalizer",
    "NormalizerError", "SeedNormalizer", "TextNormalizer", "get_normalizer", "has_cjk",
    "EvalReport", "evaluate_rows", "format_table", "total",
]
