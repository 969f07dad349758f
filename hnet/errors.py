"""Every error type of hnet, one place. Each carries a one-line message meant for the user; the
command lines print it as `error: ...` and exit 2 (data/ has its own PrepareError, since data/
never imports hnet).
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


def report(err: Exception) -> int:
    """Print `error: <message>` on stderr and return 2, the exit status of a refused command."""
    print(f"error: {err}", file=sys.stderr)
    return 2
