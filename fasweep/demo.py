"""`make demo`'s data set: the demo spec's own (Fashion-MNIST) when a copy is found or can be downloaded, else
scikit-learn's digits, which needs no file and no network.

`python -m fasweep.demo SPEC` prints the chosen name (for `--set base.data.name=...`) on stdout and says which
it chose, in one line, on stderr.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from fasweep.data import locate
from fasweep.errors import UserError
from fasweep.spec.plan import load_spec

FALLBACK = "digits"  # scikit-learn's 8x8 digits: shipped inside a dependency


def demo_data(spec: str | Path) -> str:
    """The data set the demo trains on: the spec's `base.data` when it is found (or downloaded now), else digits."""
    data = load_spec(spec).spec.base.data
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the answer
            where = locate(data)
    except UserError:
        why = f"`fasweep train --dataset {data.name}` says why"
        print(
            f"demo data: {FALLBACK} from scikit-learn; {data.name} is neither here nor downloadable ({why})",
            file=sys.stderr,
        )
        return FALLBACK
    print(f"demo data: {data.name} ({where})", file=sys.stderr)
    return data.name


if __name__ == "__main__":
    try:
        print(demo_data(sys.argv[1]))
    except UserError as exc:
        sys.exit(f"error: {exc}")
