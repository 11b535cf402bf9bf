"""Packed vs one-per-process trials through `fasweep launch`: 16 tiny digits trials, `pack: 16` vs `pack: 1`.

The same spec and launch() call on a local Ray (`--slots` CPUs, 1-CPU trials), only `pack` differs, as a user sets
it: the driver cuts `pack: 16` into as many packs as there are slots. The MLflow store is created before either
sweep is timed. Prints each sweep's wall time (Ray already up), its Tune trials (packs) and their own time (sum of
time_total_s / slots: what the workers spent, the rest is the driver: Ray scheduling, MLflow writes, artifacts),
the ratio to `pack: 1`, and the wall over the ideal: the sum of the solo trials' own times (Tune's time_total_s
under `pack: 1`) / slots. Issue 12's targets: >= 3x less wall time, and `pack: 16`'s wall / ideal <= 1.5.

    .venv/bin/python benchmarks/bench_launch_pack.py [--trials 16] [--slots 2] [--epochs 3] [--packs 1 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

SPEC = """
name: bench_launch_pack
base:
  data: {{name: digits}}
  model: {{arch: DS0}}
  train: {{optimizer: adam, lr: 1.0e-3, epochs: {epochs}, batch_size: 32}}
seeds: {seeds}
resources: {{cpu: 1, gpu: 0}}
max_retries: 0
"""


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16, help="seeds of one condition")
    parser.add_argument("--slots", type=int, default=2, help="CPUs of the local Ray = concurrent 1-CPU Tune trials")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--packs", type=int, nargs="+", default=[1, 16], help="pack sizes to time (1 first)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune

    from fasweep.launch import launch

    walls: dict[int, float] = {}
    busy: dict[int, float] = {}  # pack size -> sum of its Tune trials' time_total_s / slots
    units: dict[int, int] = {}  # pack size -> its Tune trials
    with tempfile.TemporaryDirectory(prefix="fasweep-bench-") as tmp:
        work = Path(tmp)
        os.chdir(work)
        spec = work / "bench.yaml"
        spec.write_text(SPEC.format(epochs=args.epochs, seeds=list(range(args.trials))))
        store = f"sqlite:///{work / 'mlflow.db'}"
        MlflowClient(store).search_experiments()  # creates the store: a one-time cost neither sweep should pay
        ray.init(num_cpus=args.slots, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            for pack in args.packs:
                sets = {"pack": pack, "experiment": f"bench_launch_pack-{pack}"}
                start = time.perf_counter()
                result = launch(spec, sets=sets, tracking_uri=store)
                walls[pack] = time.perf_counter() - start
                assert result.status == "finished" and sum(result.counts.values()) == args.trials, result
                trials = tune.ExperimentAnalysis(f"{result.storage}/main").trials
                busy[pack] = sum(t.last_result["time_total_s"] for t in trials) / args.slots
                units[pack] = len(trials)
        finally:
            ray.shutdown()
    ideal = busy.get(1, 0.0)
    print(f"{args.trials} trials x {args.epochs} epochs (DS0 on digits), {args.slots} slots on a local Ray")
    if ideal:
        print(f"ideal: sum of solo trial times / slots {ideal:.1f} s")
    for pack, wall in walls.items():
        line = f"pack: {pack:<3} sweep wall {wall:6.1f} s, {units[pack]:>2} Tune trials, their own time / slots"
        line += f" {busy[pack]:6.1f} s"
        if 1 in walls and pack != 1:
            line += f"   {walls[1] / wall:.2f}x less than pack: 1 (target >= 3)"
        if ideal:
            line += f"   wall / ideal {wall / ideal:.2f}" + (" (target <= 1.5)" if pack > 1 else "")
        print(line)


if __name__ == "__main__":
    main()
