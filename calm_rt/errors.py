"""The errors calm-rt raises on purpose.

Every error a user can cause is one of these, with a message that says what
was wrong and what to do. Anything else escaping is a bug in calm-rt.
"""

from __future__ import annotations

__all__ = [
    "CalmError",
    "ConfigError",
    "DataError",
    "NotAvailableError",
    "ProtocolError",
]


class CalmError(Exception):
    """Base class of every deliberate calm-rt error."""


class ConfigError(CalmError, ValueError):
    """An option, preset or checkpoint configuration that cannot work."""


class DataError(CalmError, ValueError):
    """A session file, movie or array that does not meet the documented format.

    The message names the file (when there is one) and the offending field.
    """

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None):
        where = []
        if path:
            where.append(str(path))
        if field:
            where.append(f"field {field!r}")
        prefix = (": ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)
        self.path = path
        self.field = field


class ProtocolError(CalmError, ValueError):
    """A wire message that does not follow docs/protocol.md."""


class NotAvailableError(CalmError, RuntimeError):
    """A feature that exists in the interface but is not built yet."""
