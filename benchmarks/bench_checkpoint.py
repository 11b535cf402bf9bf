"""What checkpointing costs a trial-epoch: real `launch()` sweeps, a checkpoint every epoch vs only the final one.

For each net, the same spec is launched twice on a local Ray (already up, the data cache warm),
`checkpoint.every_epochs: 1` and `every_epochs` past the last epoch (only the final checkpoint), on fresh storage:
DS0 on digits (`--trials` trials) and PG0, a conv net, on CIFAR-10 (../shared/data/cifar10-jpeg when present, else
digits; one trial). Per launch it prints, per trial-epoch, the time a trial spends outside its epochs' compute in
its last `WINDOW` epochs (Tune's time_this_iter_s minus the trial's own epoch_time_s, averaged by Tune over the
window: reporting and checkpointing, no start-up) and the bytes the Ray workers wrote to disk (/proc io write_bytes
of every `ray::` process, polled, over the whole launch); then the difference between the two launches per extra
checkpoint and the size of one checkpoint.pt. It only uses launch() and Tune's experiment state, so it also runs
against the tree before a change (a venv whose site-packages path is the project's, without its editable finder:
`PYTHONPATH=/tmp/before /tmp/before-venv/bin/python benchmarks/bench_checkpoint.py`).

    .venv/bin/python benchmarks/bench_checkpoint.py [--trials 4] [--epochs 20] [--pg0-epochs 6] [--slots 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

SPEC = """
name: {name}
base:
  data: {data}
  model: {{arch: {arch}}}
  train: {{optimizer: adam, lr: 1.0e-3, epochs: {epochs}, batch_size: {batch}, alignment_every: 0}}
grid:
  train.lr: {lrs}
seeds: [0]
resources: {{cpu: 1, gpu: 0}}
max_concurrent: {slots}
max_retries: 0
checkpoint: {{every_epochs: {every}, keep: 2}}
"""
CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"
WINDOW = 5  # the last epochs Tune averages (it keeps last-5 and last-10 averages); the first epoch stays out


@dataclass
class Figures:
    """One launch's figures."""

    outside_s: float  # per epoch of the last WINDOW, time_this_iter_s - epoch_time_s, mean over the trials
    written: float  # bytes written by Ray worker processes per trial-epoch
    checkpoint_bytes: int  # the size of one checkpoint.pt in the storage


class WriteMeter:
    """Bytes written to disk by this process tree's Ray workers while it runs (their /proc io, polled)."""

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        self.start = self._sample()
        self.seen = dict(self.start)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _sample(self) -> dict[int, int]:
        out = {}
        for proc in self.psutil.Process().children(recursive=True):
            try:
                if proc.name().startswith("ray::") or proc.cmdline()[:1][0].startswith("ray::"):
                    out[proc.pid] = proc.io_counters().write_bytes
            except (self.psutil.Error, IndexError):
                continue
        return out

    def _poll(self) -> None:
        while not self.stopped.wait(0.05):
            for pid, written in self._sample().items():
                self.seen[pid] = max(written, self.seen.get(pid, 0))

    def stop(self) -> int:
        self.stopped.set()
        self.thread.join()
        return sum(written - self.start.get(pid, 0) for pid, written in self.seen.items())


def run(
    work: Path, name: str, data: str, arch: str, trials: int, epochs: int, every: int, batch: int, slots: int
) -> Figures:
    """Launch one sweep; its figures."""
    from ray import tune

    from fasweep.launch import launch

    lrs = [round(1e-3 * (1 + i / 100), 6) for i in range(trials)]
    spec = work / f"{name}.yaml"
    text = SPEC.format(name=name, data=data, arch=arch, epochs=epochs, batch=batch, lrs=lrs, slots=slots, every=every)
    spec.write_text(text)
    meter = WriteMeter()
    result = launch(spec, tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    written = meter.stop()
    assert result.status == "finished", result
    window = f"last-{WINDOW}-avg"
    outside = [
        t.metric_analysis["time_this_iter_s"][window] - t.metric_analysis["epoch_time_s"][window]
        for t in tune.ExperimentAnalysis(f"{result.storage}/main").trials
    ]
    size = max(p.stat().st_size for p in Path(result.storage).rglob("checkpoint.pt"))
    return Figures(sum(outside) / len(outside), written / (trials * epochs), size)


def compare(label: str, every: Figures, final: Figures, epochs: int) -> None:
    """Print both launches per trial-epoch, and their difference per extra checkpoint."""
    print(label)
    for what, f in (("every epoch", every), ("final only ", final)):
        print(f"  checkpoint {what}: outside-epoch {f.outside_s * 1e3:7.1f} ms, written {f.written / 1e6:6.2f} MB")
    # in the window the final-only trial writes 1 checkpoint, the other WINDOW; over the launch 1 and `epochs`
    delta_s = (every.outside_s - final.outside_s) * WINDOW / (WINDOW - 1)
    delta_b = (every.written - final.written) * epochs / (epochs - 1)
    print(
        f"  per extra checkpoint: {delta_s * 1e3:+.1f} ms, {delta_b / 1e6:+.2f} MB written; "
        f"checkpoint.pt {every.checkpoint_bytes / 1e6:.2f} MB"
    )


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="DS0 trials per launch")
    parser.add_argument("--epochs", type=int, default=20, help="DS0 epochs per trial")
    parser.add_argument("--pg0-epochs", type=int, default=6)
    parser.add_argument("--pg0-images", type=int, default=1000, help="CIFAR-10 training images per PG0 epoch")
    parser.add_argument("--slots", type=int, default=2, help="CPUs of the local Ray = concurrent 1-CPU trials")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    assert min(args.epochs, args.pg0_epochs) > WINDOW, f"epochs past the first {WINDOW}"
    import ray
    import yaml

    from fasweep.config import DataConfig
    from fasweep.data import load_data

    cifar = (CIFAR10 / "train").is_dir()
    pg0_data = f"{{name: cifar10, root: {CIFAR10}, limit_train: {args.pg0_images}, limit_test: 500}}"
    if cifar:
        load_data(DataConfig.model_validate(yaml.safe_load(pg0_data)))  # the decoded cache, before any timing
    with tempfile.TemporaryDirectory(prefix="fasweep-bench-") as tmp:
        work = Path(tmp)
        os.chdir(work)
        ray.init(num_cpus=args.slots, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            ds0, pg0 = {}, {}
            for every in (1, args.epochs + 1):
                name = f"bench_ckpt_ds0_{every}"
                ds0[every] = run(work, name, "{name: digits}", "DS0", args.trials, args.epochs, every, 32, args.slots)
            for every in (1, args.pg0_epochs + 1):
                data = pg0_data if cifar else "{name: digits}"
                name = f"bench_ckpt_pg0_{every}"
                pg0[every] = run(work, name, data, "PG0", 1, args.pg0_epochs, every, 128, args.slots)
        finally:
            ray.shutdown()
    print(f"{args.slots} slots on a local Ray; per trial-epoch: time outside the epoch's compute, bytes workers wrote")
    compare(f"DS0 on digits: {args.trials} trials x {args.epochs} epochs", ds0[1], ds0[args.epochs + 1], args.epochs)
    where = f"CIFAR-10 ({args.pg0_images} training images)" if cifar else "digits (no CIFAR-10 copy found)"
    compare(f"PG0 on {where}: 1 trial x {args.pg0_epochs} epochs", pg0[1], pg0[args.pg0_epochs + 1], args.pg0_epochs)


if __name__ == "__main__":
    main()
