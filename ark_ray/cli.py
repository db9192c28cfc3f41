"""How every job starts and fails on the command line.

Why one wrapper: a user who mistypes a key, names a missing manifest or an output they cannot
write should read one line that says what is wrong and what to do, at once, not a traceback
after Ray and vLLM have started. `run_job` runs a job's `main(argv)`; a `UserError` (a bad key
or value, a missing input, an unwritable output, a run folder that holds a run: every error class
of that kind derives from `ark_ray.config.UserError`) ends it with

    <job>: <the problem and what to do>

on stderr and exit status 2, the convention of argparse and most Unix tools for bad usage.
Anything else is a bug (or a failure of the cluster) and keeps its traceback. `--debug` (or
ARK_DEBUG=1) shows the traceback of a user error too. Jobs check their inputs and outputs before
they import Ray or start anything (`ark_ray.data.preflight`), so these lines come within seconds.

This module imports nothing beyond the standard library until a job fails, so a job can use it
first thing, even under a Python that lacks the project's libraries.
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Callable, Optional, TypeVar

if TYPE_CHECKING:
    from ark_ray.config import UserError

T = TypeVar("T")

#: The exit status of a bad usage (argparse's).
USAGE_EXIT = 2


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """(`argv` without `--debug`, whether it was there or ARK_DEBUG is set)."""
    rest = [a for a in argv if a != "--debug"]
    return rest, len(rest) != len(argv) or os.environ.get("ARK_DEBUG", "") not in ("", "0")


def outside_venv() -> bool:
    """This Python is a system one, not a virtual environment's (the jobs' dependencies live in .venv)."""
    return sys.prefix == sys.base_prefix


def user_error(e: BaseException) -> Optional[UserError]:
    """`e` as a UserError, also when Ray wrapped it (a RayTaskError of a task or actor that raised
    one carries it as `cause`); None for any other error."""
    from ark_ray.config import UserError   # here: a system Python without yaml still gets run_job's one line

    cause = getattr(e, "cause", None)
    if isinstance(cause, UserError):
        return cause
    return e if isinstance(e, UserError) else None


def one_line(name: str, e: BaseException) -> str:
    """`<name>: <message>` for stderr (never a Python object repr: the message is the error's text)."""
    text = str(e).strip() or type(e).__name__
    return f"{name}: {text}"


def run_job(name: str, main: Callable[[list[str]], T], argv: Optional[list[str]] = None) -> T:
    """Run `main(argv)` (default: sys.argv[1:], `--debug` taken out) as the job `name`: a user
    error exits 2 with one line on stderr; Ctrl-C exits 130 with one line; a missing library in a
    Python outside any virtual environment (a plain `python jobs/X.py` before `source
    .venv/bin/activate`) exits 2 with one line that says to activate it."""
    args, debug = split_debug(list(sys.argv[1:] if argv is None else argv))
    try:
        return main(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{name}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except ModuleNotFoundError as e:
        if debug or not outside_venv():
            raise
        print(f"{name}: {e} in {sys.executable}, which is not the project's Python: run `source .venv/bin/activate` "
              f"first (or call .venv/bin/python); `bash scripts/setup.sh` makes .venv", file=sys.stderr, flush=True)
        raise SystemExit(USAGE_EXIT) from None
    except BaseException as e:  # noqa: BLE001 - only user errors are handled; the rest is re-raised
        err = user_error(e)
        if err is None or debug:
            raise
        sys.stdout.flush()
        print(one_line(name, err), file=sys.stderr, flush=True)
        raise SystemExit(USAGE_EXIT) from None
