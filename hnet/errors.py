"""Every error type of hnet, one place. Each carries a one-line message meant for the user; the
command lines print it as `error: ...` with `report` and exit 2 (data/ has its own PrepareError,
since data/ never imports hnet).
"""

import sys


class HNetError(Exception):
    """Base of hnet's errors: bad input the user can fix, described in one line."""


class ConfigError(HNetError, ValueError):
    """A model or run configuration problem, naming the offending field."""


class DataError(HNetError):
    """A prepared corpus is missing, malformed, or unusable as asked."""


class RunError(HNetError, RuntimeError):
    """A run-level problem: the run folder, resume, divergence."""


class RunWriteError(RunError):
    """Writing into the run folder failed (no space left, no permission, a quota): the command
    lines print one line and exit with WRITE_FAILED_EXIT; what was written before is intact."""


WRITE_FAILED_EXIT = 4  # train.py's exit status when the run folder cannot be written


class CheckpointError(HNetError):
    """No usable checkpoint, or the one asked for is not usable."""


class LoadError(HNetError):
    """A run or export folder that cannot be loaded as a model."""


class EvalError(HNetError, ValueError):
    """Bad evaluation input."""


class GenerationError(HNetError, ValueError):
    """An unusable generation request (empty prompt, prompt longer than the cache, bad options)."""


class FlopsError(HNetError, ValueError):
    """Missing or inconsistent inputs for a FLOPs count."""


class ConvertError(HNetError):
    """A checkpoint file, config or model that cannot be converted to or from the reference's format."""


def describe_write_failure(err: BaseException) -> str:
    """The cause of a failed write in a few words: the OSError's strerror found in the exception
    or its chain (orbax and tensorstore wrap them), else the first line of its message."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = str(err)
    for known in (
        "No space left on device",
        "Disk quota exceeded",
        "Permission denied",
        "Read-only file system",
        "File too large",
        "Input/output error",
    ):
        if known.lower() in text.lower():
            return known
    lines = text.strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def report(err: Exception | str, status: int = 2) -> int:
    """How every command line reports what stops it: prints `error: <message>` on stderr, one line,
    and returns `status` for the command to exit with (2, a refused command, unless told otherwise)."""
    print(f"error: {err}", file=sys.stderr, flush=True)
    return status
