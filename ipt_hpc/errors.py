"""Exceptions a user can act on: each names the file, record or key at fault."""


class IptError(Exception):
    """Base class for errors the CLI prints without a traceback."""


class RecordError(IptError):
    """A bad input record or a damaged record file (message: ``file:line: reason``)."""

    def __init__(self, path: object, line: int | None, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


class ConfigError(IptError):
    """An invalid configuration file or override (message names the file and key)."""
