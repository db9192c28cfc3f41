"""What a job shows its user: a header, one progress bar, a line per event that matters, the closing
table; everything else in `<run>/job.log`.

Why at the OS level: vLLM, Ray (the worker output it forwards to the driver), transformers and
DeepSpeed write from C++, subprocesses and many loggers. With `quiet`, the console moves the
process's stdout/stderr file descriptors onto `job.log`, so all of that follows, and keeps a
duplicate of the terminal for its own lines. Jobs (OPD, batch transcription) build their own
output on this; a failure gives the terminal back (`restore`) so the traceback is seen.
"""
from __future__ import annotations

import os
import pathlib
import sys
from typing import Optional


class JobConsole:
    """Terminal output of one run; `quiet` moves everything else to `<run_dir>/job.log`. With no
    `run_dir`, plain lines on stdout (a library call, a test)."""

    def __init__(self, run_dir: Optional[str | os.PathLike] = None, quiet: bool = True):
        self.run_dir = pathlib.Path(run_dir) if run_dir is not None else None
        self.log_path = self.run_dir / "job.log" if self.run_dir is not None else None
        self.quiet = quiet and self.run_dir is not None
        self._saved: Optional[tuple[int, int]] = None
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.quiet:
            sys.stdout.flush()
            sys.stderr.flush()
            self._saved = (os.dup(1), os.dup(2))
            self.term = os.fdopen(os.dup(self._saved[0]), "w", buffering=1)
            fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
        else:
            self.term = sys.stdout
        self.bar = None

    def line(self, msg: str = "") -> None:
        """A line on the terminal, above the progress bar."""
        if self.bar is not None:
            self.bar.write(msg, file=self.term)
        else:
            print(msg, file=self.term, flush=True)

    def start_bar(self, total: int, desc: str, unit: str, disable: bool = False):
        """The run's one progress bar (tqdm) on the terminal."""
        from tqdm import tqdm

        self.close_bar()
        self.bar = tqdm(total=total, file=self.term, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5,
                        disable=disable,
                        bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}")
        return self.bar

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def restore(self) -> None:
        """Give the terminal back to stdout/stderr (at the end, or on failure so the traceback is seen)."""
        self.close_bar()
        if self._saved is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(self._saved[0], 1)
            os.dup2(self._saved[1], 2)
            for fd in self._saved:
                os.close(fd)
            self._saved = None


def table(rows: list[tuple[str, str]], title: str = "") -> str:
    """A two-column Markdown table."""
    w = max(len(k) for k, _ in rows)
    out = [title] if title else []
    out += [f"| {'metric'.ljust(w)} | value |", f"|{'-' * (w + 2)}|-------|"]
    out += [f"| {k.ljust(w)} | {v} |" for k, v in rows]
    return "\n".join(out)
