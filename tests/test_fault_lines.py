"""fasweep.faults (fast): one line for an environment fault, from the exception or from its text alone."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest

from fasweep.faults import describe_fault, describe_fault_text, free_space


def test_a_full_disk_reads_the_same_from_its_exception_and_from_its_traceback(tmp_path: Path) -> None:
    storage = str(tmp_path)
    with pytest.raises(OSError) as caught, open("/dev/full", "wb", buffering=0) as full:  # a real ENOSPC
        full.write(b"x")
    want = (
        f"{storage}: ENOSPC (No space left on device, {free_space(storage)}); "
        "free some space or point `storage:` (--set storage=...) at a larger disk"
    )
    assert describe_fault(caught.value, storage) == want
    text = "".join(traceback.format_exception(caught.value))  # what a retried trial's error says
    assert describe_fault_text(text, storage) == want


def test_a_fault_named_only_in_words_and_no_fault() -> None:
    text = "OSError: When uploading part for key 'a/b': AWS Error UNKNOWN: Read-only file system"  # pyarrow: no errno
    assert describe_fault_text(text) == (
        f"storage: EROFS (Read-only file system, {free_space('storage')}); "
        "point `storage:` (--set storage=...) at a writable disk"
    )
    assert describe_fault_text("ValueError: loss is nan", "/tmp") is None
