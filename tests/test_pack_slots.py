"""Packs cut to fill the slots of a real local Ray (2 CPUs): `fasweep.cluster.slots_of` and a launch's Tune trials."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ray import tune

from fasweep.cluster import slots_of
from fasweep.launch import launch
from fasweep.spec.plan import parse_spec
from fasweep.worker import pack_id

SPEC = """
name: slots
base:
  data: {name: digits, limit_train: 256, limit_test: 64}
  model: {arch: Dense32 Dense10}
  train: {epochs: 1, alignment_every: 0}
seeds: [0, 1, 2, 3]
pack: 4
max_retries: 0
"""


@pytest.fixture(scope="module")
def two_cpus() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.parametrize(
    ("sets", "slots"),
    [
        ({}, 2),
        ({"resources.cpu": 0.5}, 4),
        ({"resources.cpu": 0.5, "max_concurrent": 3}, 3),
        ({"resources.cpu": 2}, 1),
        ({"resources.gpu": 1}, 1),  # no GPU here: never below one slot
    ],
)
def test_slots_are_the_cluster_over_a_pack_at_most_max_concurrent(
    two_cpus: None, sets: dict[str, Any], slots: int
) -> None:
    assert slots_of(parse_spec(SPEC, sets)) == {"main": slots}


def test_a_launch_cuts_its_pack_to_fill_both_cpus(
    two_cpus: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "slots.yaml"
    spec.write_text(SPEC)
    result = launch(spec, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.status == "finished" and result.counts == {"finished": 4}
    assert "4 trials (1 condition × 4 seeds) in 2 packs (cut to fill 2 slots);" in capsys.readouterr().out
    units = sorted(t.config["key"] for t in tune.ExperimentAnalysis(f"{result.storage}/main").trials)
    assert units == [pack_id(["main/base/s0", "main/base/s1"]), pack_id(["main/base/s2", "main/base/s3"])]
