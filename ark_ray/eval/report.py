"""Evaluation reports: one row per predictions file (or dataset), a combined total, and the
markdown table every job prints at the end (the same shape as the other jobs' summaries)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ark_ray.eval.metrics import EvalError, Scores, score_utterance
from ark_ray.eval.normalizers import NormalizerLike, get_normalizer


@dataclass
class EvalReport:
    """Scores of one predictions file or dataset.

    `n` counts every row read; `error_rows` those whose transcription failed (non-null `error`),
    which are left out of the rates and listed in `errors` (id and message, first `max_listed`)."""

    name: str
    n: int = 0
    error_rows: int = 0
    scores: Scores = field(default_factory=Scores)
    errors: list[dict] = field(default_factory=list)

    def __add__(self, other: "EvalReport") -> "EvalReport":
        return EvalReport("total", self.n + other.n, self.error_rows + other.error_rows,
                          self.scores + other.scores, self.errors + other.errors)

    def summary(self) -> dict:
        """The table row: counts and rates (rates are None when nothing was scored)."""
        def rate(c):
            return None if math.isnan(c.rate) else c.rate
        s = self.scores
        return {"name": self.name, "n": self.n, "scored": s.jwer.utterances, "error_rows": self.error_rows,
                "empty_refs": s.jwer.empty_refs, "wer": rate(s.wer), "cer": rate(s.cer), "jwer": rate(s.jwer)}

    def to_dict(self) -> dict:
        return {**self.summary(), "counts": self.scores.to_dict(), "errors": self.errors}

    @classmethod
    def from_dict(cls, d: dict) -> "EvalReport":
        return cls(d["name"], int(d["n"]), int(d["error_rows"]), Scores.from_dict(d["counts"]),
                   list(d.get("errors", [])))


def evaluate_rows(rows: Iterable[dict], name: str, *, normalizer: NormalizerLike = "auto",
                  text_field: str = "text", pred_field: str = "pred_text",
                  max_listed: int = 20) -> tuple[EvalReport, list[dict]]:
    """Score transcription output rows (reference in `text_field`, prediction in `pred_field`).

    A row with a non-null `error`, or with no prediction, is an error row: counted, listed, not
    scored. Returns the report and the rows with their cleaned texts and edit counts added,
    worst (most J/WER edits) first, as open-audio-opd's eval script writes them."""
    norm = get_normalizer(normalizer)
    report, scored = EvalReport(name), []
    for i, row in enumerate(rows):
        report.n += 1
        ref, hyp, err = row.get(text_field), row.get(pred_field), row.get("error")
        if not isinstance(ref, str):
            raise EvalError(f"{name}: row {i + 1}: reference {text_field!r} must be a string, got {ref!r}")
        if err is None and not isinstance(hyp, str):
            err = f"no {pred_field!r} in the row" if hyp is None else f"{pred_field!r} is not a string: {hyp!r}"
        if err is not None:
            report.error_rows += 1
            if len(report.errors) < max_listed:
                report.errors.append({"row": i + 1, "id": row.get("id", row.get("audio")), "error": str(err)})
            scored.append({**row, "error": str(err)})
            continue
        u = score_utterance(ref, hyp, norm)
        report.scores = report.scores + Scores(u.words, u.chars, u.mixed)
        scored.append({**row, "ref_text_clean": u.ref_clean, "pred_text_clean": u.hyp_clean, "cjk": u.cjk,
                       "word_errors": u.words.errors, "ref_words": u.words.ref_len,
                       "char_errors": u.chars.errors, "ref_chars": u.chars.ref_len,
                       "jwer_errors": u.mixed.errors, "jwer_ref_len": u.mixed.ref_len})
    scored.sort(key=lambda r: r.get("jwer_errors", -1), reverse=True)
    return report, scored


def total(reports: Sequence[EvalReport]) -> EvalReport:
    """All reports combined by their edit counts (not an average of their rates)."""
    out = EvalReport("total")
    for r in reports:
        out = out + r
    return out


COLUMNS = (("name", "file"), ("n", "n"), ("scored", "scored"), ("error_rows", "errors"),
           ("empty_refs", "empty refs"), ("wer", "WER %"), ("cer", "CER %"), ("jwer", "J/WER %"))


def _cell(key: str, value) -> str:
    if key in ("wer", "cer", "jwer"):
        return "-" if value is None else f"{100 * value:.2f}"
    return str(value)


def format_table(reports: Sequence[EvalReport], *, with_total: bool | None = None) -> str:
    """A markdown table, one row per report, plus a total row when there are several."""
    rows = [r.summary() for r in reports]
    if with_total or (with_total is None and len(reports) > 1):
        rows.append(total(reports).summary())
    cells = [[title for _, title in COLUMNS]] + [[_cell(k, row[k]) for k, _ in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(r, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])
