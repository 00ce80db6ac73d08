"""One exception family for everything rankshrink reports to users.

Every message names the thing that is wrong (layer, file, parameter) and what to do
about it; the CLI prints ``str(error)`` on one line and exits with status 1.
Subclasses also derive from the matching built-in so ``except ValueError`` still works.
"""


class RankshrinkError(Exception):
    """Base class of all errors raised on purpose by rankshrink."""


class ConfigError(RankshrinkError, ValueError):
    """A parameter value is out of range or of the wrong kind."""


class UnreachableLatencyError(ConfigError):
    """A latency budget below what any plan measures; ``fastest_ratios`` is the fastest plan's measured
    time ratio to the original at each batch size, for callers that report it (benchmarks)."""

    def __init__(self, message: str, fastest_ratios: dict[int, float]) -> None:
        super().__init__(message)
        self.fastest_ratios = dict(fastest_ratios)


class LayerError(RankshrinkError, ValueError):
    """A layer cannot be factorized/adapted as asked (wrong type, method or rank)."""


class PlanError(RankshrinkError, ValueError):
    """A plan is malformed or does not fit the model it is applied to."""


class FileFormatError(RankshrinkError, ValueError):
    """A file is missing, unreadable, corrupt, of the wrong format or does not match."""


class DataError(RankshrinkError, ValueError):
    """A data set is missing, empty or does not fit the model."""


class UnsafeFileError(RankshrinkError, PermissionError):
    """A file would need pickle (arbitrary code execution) to load."""


class OutputBusyError(RankshrinkError, RuntimeError):
    """Another rankshrink process is writing the same output directory."""


class DiskFullError(RankshrinkError, OSError):
    """A write failed because the file system is full; what was written before is intact."""
