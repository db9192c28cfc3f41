"""Response bodies of /v1/audio/transcriptions in OpenAI's shapes (json, text, verbose_json, srt, vtt, SSE).

Pure functions over a `Transcript`, so every format shows the same text and the same segment
times, and the shapes can be tested without a server. Segments are the shared chunker's windows
(<= 30 s each): ARK-ASR has no timestamp tokens, so a window is the finest time we can vouch for.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

from ark_ray.engines.base import Transcript
from ark_ray.eval.language import guess_language

RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")


@dataclass
class SegmentStats:
    """Per-window numbers verbose_json reports next to the text."""
    avg_logprob: float
    temperature: float


def compression_ratio(text: str) -> float:
    """Whisper's repetition signal: UTF-8 length over zlib-compressed length (0 for empty text)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _timestamp(seconds: float, sep: str) -> str:
    ms = int(round(max(0.0, seconds) * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt_timestamp(seconds: float) -> str:
    """`HH:MM:SS,mmm` (SubRip)."""
    return _timestamp(seconds, ",")


def vtt_timestamp(seconds: float) -> str:
    """`HH:MM:SS.mmm` (WebVTT)."""
    return _timestamp(seconds, ".")


def _cues(t: Transcript) -> list[tuple[float, float, str]]:
    """Non-empty segments; a short clip with no segments is one cue over the whole clip."""
    segs = t.segments or []
    cues = [(s.start_s, s.end_s, s.text.strip()) for s in segs]
    if not segs:
        cues = [(0.0, t.duration_s, t.text.strip())]
    return [c for c in cues if c[2]]


def to_srt(t: Transcript) -> str:
    blocks = [f"{i}\n{srt_timestamp(a)} --> {srt_timestamp(b)}\n{text}\n"
              for i, (a, b, text) in enumerate(_cues(t), start=1)]
    return "\n".join(blocks)


def to_vtt(t: Transcript) -> str:
    blocks = [f"{vtt_timestamp(a)} --> {vtt_timestamp(b)}\n{text}\n" for a, b, text in _cues(t)]
    return "WEBVTT\n\n" + "\n".join(blocks)


def duration_usage(t: Transcript) -> dict:
    return {"type": "duration", "seconds": round(t.duration_s, 3)}


def token_usage(t: Transcript, prompt_tokens: int) -> dict:
    out = len(t.token_ids)
    return {"type": "tokens", "input_tokens": prompt_tokens, "output_tokens": out,
            "total_tokens": prompt_tokens + out}


def reported_language(requested: Optional[str], text: str) -> tuple[str, str]:
    """(language, where it came from) for verbose_json. ARK-ASR identifies no language: the
    request's `language` as sent (`request`), else a guess from the transcript's script, as the
    lower-case English name OpenAI's API uses (`script_guess`; Latin text reads as english)."""
    if requested:
        return requested, "request"
    return guess_language(text).lower(), "script_guess"


def to_verbose(t: Transcript, stats: Sequence[SegmentStats], language: Optional[str]) -> dict:
    """OpenAI's TranscriptionVerbose, plus `language_source` (`request` or `script_guess`: the
    language is a guess unless the request named it). `no_speech_prob` is 0.0: ARK-ASR has no
    no-speech head."""
    segments = [{
        "id": i, "seek": int(round(s.start_s * 100)), "start": round(s.start_s, 3), "end": round(s.end_s, 3),
        "text": s.text, "tokens": list(s.token_ids), "temperature": st.temperature,
        "avg_logprob": st.avg_logprob, "compression_ratio": compression_ratio(s.text), "no_speech_prob": 0.0,
    } for i, (s, st) in enumerate(zip(t.segments, stats))]
    lang, source = reported_language(language, t.text)
    return {"task": "transcribe", "language": lang, "language_source": source, "duration": round(t.duration_s, 3),
            "text": t.text, "segments": segments, "usage": duration_usage(t)}


def render(t: Transcript, response_format: str, stats: Sequence[SegmentStats],
           language: Optional[str]) -> tuple[str, str]:
    """(body, media type) for a finished transcript."""
    if response_format == "json":
        return json.dumps({"text": t.text, "usage": duration_usage(t)}), "application/json"
    if response_format == "verbose_json":
        return json.dumps(to_verbose(t, stats, language)), "application/json"
    if response_format == "text":
        return t.text + "\n", "text/plain; charset=utf-8"
    if response_format == "srt":
        return to_srt(t), "text/plain; charset=utf-8"
    if response_format == "vtt":
        return to_vtt(t), "text/vtt; charset=utf-8"
    raise ValueError(f"unknown response_format {response_format!r}")


def sse(event: dict) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(event)}\n\n"


def stable_prefix(text: str) -> str:
    """The part of a partial transcript later tokens cannot change: up to an incomplete UTF-8
    character (U+FFFD) or an unclosed `<` (a `<|...|>` marker cleanup may still remove), with
    trailing spaces dropped (cleanup strips them)."""
    cut = len(text)
    if "\ufffd" in text:
        cut = text.index("\ufffd")
    lt = text.rfind("<", 0, cut)
    if lt > text.rfind(">", 0, cut):
        cut = lt
    return text[:cut].rstrip()


def delta_event(text: str) -> dict:
    return {"type": "transcript.text.delta", "delta": text}


def done_event(t: Transcript, prompt_tokens: int) -> dict:
    return {"type": "transcript.text.done", "text": t.text, "usage": token_usage(t, prompt_tokens)}


def avg_logprob(logprobs) -> float:
    """Mean log-prob of a window's tokens (0.0 for an empty window)."""
    vals = [float(x) for x in (logprobs if logprobs is not None else [])]
    return sum(vals) / len(vals) if vals else 0.0
