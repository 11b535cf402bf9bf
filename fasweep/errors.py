"""The one exception type for user mistakes (the CLI prints it as a single line, exit code 2) and the helpers its
messages share: `suggest` a close name, `listed` a long list cut short."""

from __future__ import annotations

import difflib
from typing import Any


class UserError(Exception):
    """A mistake in the user's input: bad field, missing data, unreachable store.

    The message is one line that names the field, the value and the fix.
    """

    expected: str | None = None  # EXPECTED of a `field` error (a validator re-raises it for its own field)

    @classmethod
    def field(cls, path: str, value: Any, expected: str, *, where: str = "") -> UserError:
        """Build the standard message: ``[where: ]path: got VALUE; expected EXPECTED``."""
        prefix = f"{where}: " if where else ""
        error = cls(f"{prefix}{path}: got {value!r}; expected {expected}")
        error.expected = expected
        return error


def suggest(value: str, names: list[str]) -> str:
    """' (did you mean X?)' for the closest of `names`, or ''."""
    close = difflib.get_close_matches(value, names, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def listed(names: list[str], most: int = 12) -> str:
    """The first `most` names, comma-separated, and how many more: `a, b, c and 9 more`."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
