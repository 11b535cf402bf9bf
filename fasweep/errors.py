"""The one exception type for user mistakes; the CLI prints it as a single line (exit code 2)."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A mistake in the user's input: bad field, missing data, unreachable store.

    The message is one line that names the field, the value and the fix.
    """

    @classmethod
    def field(cls, path: str, value: Any, expected: str, *, where: str = "") -> UserError:
        """Build the standard message: ``[where: ]path: got VALUE; expected EXPECTED``."""
        prefix = f"{where}: " if where else ""
        return cls(f"{prefix}{path}: got {value!r}; expected {expected}")
