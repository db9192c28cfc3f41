"""Languages of transcripts: names from codes, and a guess from the text's script.

Why here, below every job: the Qwen3-ASR teacher's prompt names the clip's language, and the
Serve endpoint's verbose_json reports one. ARK-ASR identifies no language, so where none is given
both fall back to a guess from the transcript's script (open-audio-opd's heuristic, shortened:
kana -> Japanese, Hangul -> Korean, Han -> Chinese or Cantonese, Cyrillic, Arabic, Thai, Greek,
Devanagari; Latin text -> the given fallback, else English). Whoever reports the guess says it is one.
"""
from __future__ import annotations

from typing import Optional

_NAMES = {"ar": "Arabic", "yue": "Cantonese", "zh": "Chinese", "cs": "Czech", "da": "Danish", "nl": "Dutch",
          "en": "English", "fil": "Filipino", "fi": "Finnish", "fr": "French", "de": "German", "el": "Greek",
          "hi": "Hindi", "hu": "Hungarian", "id": "Indonesian", "it": "Italian", "ja": "Japanese", "ko": "Korean",
          "mk": "Macedonian", "ms": "Malay", "fa": "Persian", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian",
          "ru": "Russian", "es": "Spanish", "sv": "Swedish", "th": "Thai", "tr": "Turkish", "vi": "Vietnamese"}


def language_name(lang: Optional[str]) -> Optional[str]:
    """'en' / 'EN' / 'en_US' / 'English' -> 'English'; None or unknown -> None."""
    if not lang:
        return None
    s = str(lang).strip()
    if s.title() in _NAMES.values():
        return s.title()
    code = s.lower().replace("-", "_").split("_")[0]
    return _NAMES.get(code)


def guess_language(text: str, fallback: Optional[str] = None) -> str:
    """The Qwen3-ASR language name for `text` by script; Latin (or no letters) -> fallback or English."""
    fb = language_name(fallback)
    counts = {"kana": 0, "han": 0, "hangul": 0, "cyr": 0, "arab": 0, "thai": 0, "greek": 0, "deva": 0}
    for ch in text or "":
        o = ord(ch)
        if 0x3040 <= o <= 0x30FF:
            counts["kana"] += 1
        elif 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF:
            counts["han"] += 1
        elif 0xAC00 <= o <= 0xD7AF or 0x1100 <= o <= 0x11FF:
            counts["hangul"] += 1
        elif 0x0400 <= o <= 0x04FF:
            counts["cyr"] += 1
        elif 0x0600 <= o <= 0x06FF:
            counts["arab"] += 1
        elif 0x0E00 <= o <= 0x0E7F:
            counts["thai"] += 1
        elif 0x0370 <= o <= 0x03FF:
            counts["greek"] += 1
        elif 0x0900 <= o <= 0x097F:
            counts["deva"] += 1
    if counts["kana"]:
        return "Japanese"
    if counts["hangul"]:
        return "Korean"
    if counts["han"]:
        return fb if fb in ("Cantonese", "Japanese") else "Chinese"
    if counts["cyr"]:
        return fb if fb == "Macedonian" else "Russian"
    if counts["arab"]:
        return "Persian" if fb == "Persian" or any(c in text for c in "پچژگ") else "Arabic"
    for key, name in (("thai", "Thai"), ("greek", "Greek"), ("deva", "Hindi")):
        if counts[key]:
            return name
    return fb or "English"
