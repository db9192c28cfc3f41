"""One typed error for every way an audio input can be unusable.

Batch jobs turn it into an error row (`reason` is the column value), the HTTP endpoint into a
400 naming the reason, training into a skipped-and-counted sample. Nothing else is raised for
bad audio, so callers catch exactly one thing.
"""
from __future__ import annotations

import re

REASONS = ("empty", "unreadable", "unsupported_format", "non_finite", "zero_length_segment",
           "bad_segment", "too_long", "silent", "bad_row")
#: `bad_row`: a manifest line that cannot be used (not JSON, no `audio`, a value of the wrong type);
#: `silent` is an error only where asked (TranscribeConfig.silent_is_error).


#: A Python object's repr (`<_io.BytesIO object at 0x7f...>`), which a library may put in its message.
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


class AudioError(ValueError):
    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown audio error reason {reason!r}")
        message = _OBJECT_REPR.sub("the audio", message)   # error rows and HTTP 400s are read by people
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # survives pickling across Ray workers
        return (AudioError, (self.reason, self.message))
