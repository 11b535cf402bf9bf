"""Sweep overhead of `fasweep launch`: 20 small trials on a local Ray, wall time vs the trials' own time / slots.

Prints, in one run: the sweep's wall time (launch() with Ray already up: scheduling, checkpoint persistence,
MLflow writes and the final flush included), the sum of the trials' own times (Tune's time_total_s: data load,
model build, epochs, reports) and of their epochs alone, and the ratios wall / (sum / slots). Target: <= 1.15.

    .venv/bin/python benchmarks/bench_launch.py [--trials 20] [--slots 2] [--epochs 30]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

SPEC = """
name: bench_launch
base:
  data: {{name: digits}}
  model: {{arch: DS0}}
  train: {{optimizer: adam, lr: 1.0e-3, epochs: {epochs}, batch_size: 32}}
grid:
  train.lr: {lrs}
seeds: [0]
resources: {{cpu: 1, gpu: 0}}
max_concurrent: {slots}
max_retries: 0
"""


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--slots", type=int, default=2, help="CPUs of the local Ray = concurrent 1-CPU trials")
    parser.add_argument("--epochs", type=int, default=30, help="30: trials of about 5 s on one core")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune

    from fasweep.launch import launch
    from fasweep.runs.layout import Role, Tag

    with tempfile.TemporaryDirectory(prefix="fasweep-bench-") as tmp:
        work = Path(tmp)
        os.chdir(work)
        lrs = [round(1e-3 * (1 + i / 100), 6) for i in range(args.trials)]
        spec = work / "bench.yaml"
        spec.write_text(SPEC.format(epochs=args.epochs, lrs=lrs, slots=args.slots))
        ray.init(num_cpus=args.slots, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            start, cpu = time.perf_counter(), time.process_time()
            result = launch(spec, tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        finally:
            ray.shutdown()
        trials = tune.ExperimentAnalysis(f"{result.storage}/main").trials
        trial_s = [t.last_result["time_total_s"] for t in trials]
        client = MlflowClient(result.tracking_uri)
        experiment = client.get_experiment_by_name("bench_launch").experiment_id
        children = client.search_runs([experiment], f"tags.`{Tag.ROLE}` = '{Role.TRIAL}'")  # not condition runs
        epoch_s = [sum(m.value for m in client.get_metric_history(r.info.run_id, "epoch_time_s")) for r in children]
    assert result.status == "finished" and len(trial_s) == args.trials, (result, len(trial_s))
    ideal_trial, ideal_epoch = sum(trial_s) / args.slots, sum(epoch_s) / args.slots
    print(f"{args.trials} trials x {args.epochs} epochs (DS0 on digits), {args.slots} slots on a local Ray")
    print(f"sweep wall time                       {wall:8.1f} s")
    print(
        f"sum of trial times / slots            {ideal_trial:8.1f} s   ratio {wall / ideal_trial:.3f} (target <= 1.15)"
    )
    print(f"sum of epoch times / slots            {ideal_epoch:8.1f} s   ratio {wall / ideal_epoch:.3f}")
    print(f"mean trial {sum(trial_s) / len(trial_s):.2f} s, mean epochs per trial {sum(epoch_s) / len(epoch_s):.2f} s")
    print(
        f"driver CPU time during the sweep      {cpu:8.1f} s (Tune loop, MLflow writer; shares the {args.slots} cores)"
    )


if __name__ == "__main__":
    main()
