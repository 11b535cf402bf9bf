"""The report's choices by name: output formats, `--at`, `--ci` and pairings.

Free of scipy, matplotlib and MLflow (unlike `fasweep.report`), so the CLI lists them in its help and refuses
another value before anything is read, and the spec validates `pairing` with the same words.
"""

from __future__ import annotations

from typing import Literal

FORMATS = ("md", "csv", "html", "json")  # `fasweep report --format`
AT = ("final", "best")  # `--at`: each trial's latest epoch, or its best one
CI_METHODS = ("t", "bootstrap")  # `--ci`: Student t, or a percentile bootstrap (n >= BOOTSTRAP_MIN_N seeds)
PAIRINGS = ("none", "seed")  # spec `pairing` and `--pairing`: Welch's t, or paired t on shared seeds

Format = Literal[FORMATS]
At = Literal[AT]
CiMethod = Literal[CI_METHODS]
Pairing = Literal[PAIRINGS]
