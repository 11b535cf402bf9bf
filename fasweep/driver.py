"""A launch's state on its driver (`Driver`) and the Tune callback that feeds it (`Hooks`): each trial's status and
latest metrics, the progress line, the trials' errors (one digest line per distinct error), and every trial's start,
epochs and end queued for the run writer. A pack's key stands for its members: each is a trial here.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS
from rich.console import Console

from fasweep.checkpoints import newest_checkpoint
from fasweep.errors import listed
from fasweep.faults import describe_fault_text
from fasweep.progress import Progress, progress_line
from fasweep.runs.layout import Best, Tag, TrialStatus, trial_checkpoints, trial_status
from fasweep.runs.lease import Lease
from fasweep.runs.writer import RunWriter
from fasweep.spec.plan import Plan
from fasweep.worker import ERROR_KEY, FAULT_KEY, MEMBERS_KEY, RESUMED_KEY

log = logging.getLogger(__name__)
_TUNE_KEYS = {*AUTO_RESULT_KEYS, "done", "trial_id", "experiment_tag", "should_checkpoint", "__duplicate__"}


class Hooks(tune.Callback):
    """The Tune callback of a launch's stage: forwards every hook to its driver. Tune pickles its callbacks with the
    experiment (`tuner.pkl`); the driver stays in this process (a launch never restores a Tune experiment)."""

    def __init__(self, driver: Driver) -> None:
        self._driver: Driver | None = driver

    def __getstate__(self) -> dict[str, Any]:
        return {"_driver": None}

    @property
    def driver(self) -> Driver:
        """The launch's driver (none in a copy Tune unpickled)."""
        if self._driver is None:
            raise RuntimeError("fasweep Tune callback called outside a launch")
        return self._driver

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.driver.trial_started(trial.config["key"])

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.driver.trial_result(trial.config["key"], result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.driver.trial_ended(trial, error="")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.driver.trial_ended(trial, error=_error_text(trial.get_error()))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.driver.trial_retried(trial.config["key"], _error_text(trial.get_error()))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self.driver.step()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.driver.step(final=True)


_NO_TEXT = "its worker failed without an error text (a killed process or a lost node)"


def _error_text(error: Any) -> str:
    return str(error or "").strip() or _NO_TEXT


def _trials_n(n: int) -> str:
    """`1 trial`, `2 trials`."""
    return f"{n} trial{'s' * (n != 1)}"


def _error_line(text: str) -> str:
    """The last non-empty line of an error's text (where a traceback says what went wrong)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else _NO_TEXT


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    """The trial's own metrics in a Tune result (Tune's bookkeeping and the worker's info keys dropped)."""
    return {
        k: float(v)
        for k, v in result.items()
        if k not in _TUNE_KEYS and k != RESUMED_KEY and isinstance(v, int | float) and not isinstance(v, bool)
    }


def _fetcher(root: str, key: str) -> Callable[[Path], Path | None]:
    """A function giving a trial's newest checkpoint file from its folder under the launch's storage `root` (local,
    or copied under the given dir from a URI); None when it has none."""

    def fetch(dst: Path) -> Path | None:
        try:
            return newest_checkpoint(trial_checkpoints(root, key), dst)
        except Exception as exc:  # e.g. storage the driver cannot reach
            log.warning("checkpoint of %s not readable on the driver (%s); use shared storage", key, exc)
            return None

    return fetch


class Driver:
    """A launch's state on the driver: the writer, each trial's status and latest metrics, errors, the progress."""

    def __init__(self, writer: RunWriter, plan: Plan, configs: dict[str, dict[str, Any]], best: Best, console: Console):
        self.writer = writer
        self.best = best
        self.progress = Progress(console)
        self.trials = {t.key: replace(t, config=configs[t.key]) for t in plan.trials}  # configs as the workers get them
        self.stage = ""
        self.stage_started, self.stage_epochs = time.monotonic(), 0
        self.statuses: dict[str, str] = {}  # this stage's trials -> status
        self.latest: dict[str, dict[str, float]] = {}  # every trial's latest metrics seen by this driver
        self.resumed: dict[str, int] = {}  # trial -> epoch it continued from (a --resume or a retry)
        self.epochs_run: Counter[str] = Counter()  # epochs reported by workers under this driver
        self.errors: dict[str, str] = {}  # trial -> the full text of the error it ended with
        self.retried: dict[str, str] = {}  # trial -> the full text of an error Tune retried it after
        self.user_errors: dict[str, str] = {}  # trial -> a user error it reported (not retried)
        self.fault = ""  # an environment fault a trial hit: the launch stops
        self.signal: int | None = None  # a signal that asks the launch to stop
        self.storage = ""  # the launch's storage root
        self.resuming_keys: set[str] = set()  # this stage's --resume trials, until its one line is said
        self.checkpointed: set[str] = set()  # those whose folders hold checkpoints
        self.packs: dict[str, list[str]] = {}  # pack key -> its members' trial keys
        self.lease: Lease | None = None  # the launch's lease: taken over, the driver stops
        self.ended: set[str] = set()  # trials whose end this driver queued for the writer
        self.stopping = False  # Tune was told to stop because the lease was taken over

    def start_stage(self, stage: str, statuses: dict[str, str]) -> None:
        """Begin showing `stage`, whose trials have these statuses now."""
        self.stage, self.statuses = stage, dict(statuses)
        self.stage_started, self.stage_epochs = time.monotonic(), sum(self.epochs_run.values())

    def eta_s(self) -> float | None:
        """Seconds until the stage's trials have run all their epochs, at the pace of the epochs run so far."""
        done = sum(self.epochs_run.values()) - self.stage_epochs
        if done <= 0:
            return None
        left = sum(
            self.trials[k].epochs - int(self.latest.get(k, {}).get("epoch", 0))
            for k, status in self.statuses.items()
            if status in (TrialStatus.PENDING, TrialStatus.RUNNING)
        )
        return left * (time.monotonic() - self.stage_started) / done

    def interrupt(self) -> None:
        """Stop the running Tune experiment as Ctrl+C does: trials stop, their checkpoints stay."""
        handler = signal.getsignal(signal.SIGUSR1)
        if callable(handler):  # Tune's interrupt handler is installed while an experiment runs
            signal.raise_signal(signal.SIGUSR1)

    def resuming(self, keys: list[str], checkpointed: set[str]) -> None:
        """This stage's `--resume` runs `keys`, those in `checkpointed` with checkpoints in their folders."""
        self.resuming_keys, self.checkpointed = set(keys), checkpointed & set(keys)

    def say_resumed(self) -> None:
        """One line for the stage's `--resume` (once its trials have said where they continue, or at its end): how
        many continue and after which epochs, how many start over and which."""
        continued = {k: self.resumed[k] for k in self.resuming_keys if k in self.resumed}
        epochs = sorted(e for e in continued.values() if e)
        over = sorted(k for k, e in continued.items() if not e and k in self.checkpointed)
        self.resuming_keys = set()
        parts = []
        if epochs:
            span = f"epoch {epochs[0]}" if epochs[0] == epochs[-1] else f"epochs {epochs[0]}-{epochs[-1]}"
            parts.append(f"{_trials_n(len(epochs))} continue{'s' * (len(epochs) == 1)} after {span}")
        if over:
            verb = "starts" if len(over) == 1 else "start"
            parts.append(f"{len(over)} {verb} over (no readable checkpoint: {listed(over, 4)})")
        if parts:
            self.progress.say(f"[{self.stage}] " + "; ".join(parts))

    # Tune hooks (a pack's key stands for its members)
    def trial_started(self, key: str) -> None:
        for member in self.packs.get(key, [key]):
            self.statuses[member] = TrialStatus.RUNNING
            self.writer.trial_started(self.trials[member])

    def trial_result(self, key: str, result: dict[str, Any]) -> None:
        members = self.packs.get(key)
        if members is None:
            self._result(key, result)
            return
        shared = {k: result[k] for k in (ERROR_KEY, FAULT_KEY) if k in result}
        each = json.loads(result.get(MEMBERS_KEY, "{}"))
        for member in members:
            if member in each or shared:
                self._result(member, {**each.get(member, {}), **shared})

    def _result(self, key: str, result: dict[str, Any]) -> None:
        """One trial's result (of its own Tune trial, or its part of its pack's)."""
        if RESUMED_KEY in result and key not in self.resumed:
            epoch = self.resumed[key] = int(result[RESUMED_KEY])
            self.writer.trial_tags(key, {Tag.RESUMED_FROM: str(epoch)})
            if key in self.resuming_keys and self.resuming_keys <= self.resumed.keys():
                self.say_resumed()
        if ERROR_KEY in result:
            self.user_errors[key] = self.errors[key] = str(result[ERROR_KEY])
        if FAULT_KEY in result and not self.fault:
            self.fault = str(result[FAULT_KEY])
            self.interrupt()
        metrics = _metrics(result)
        if "epoch" in metrics:
            if metrics["epoch"] > self.resumed.get(key, 0):  # not the checkpoint's own epoch, reported again
                self.epochs_run[key] += 1
            self.latest[key] = metrics
            self.writer.trial_epoch(key, metrics)

    def trial_retried(self, key: str, error: str) -> None:
        """A trial failed and Tune retries it from its checkpoint (unless the failure is the environment's)."""
        for member in self.packs.get(key, [key]):
            self.retried[member] = error
        fault = describe_fault_text(_error_line(error), self.storage)
        if fault and not self.fault:
            self.fault = fault
            self.interrupt()

    def trial_ended(self, trial: Any, error: str) -> None:
        """Queue a trial's (or each pack member's) completion (Tune calls no hook for trials it stops at the end of
        an experiment)."""
        key = trial.config["key"]
        members = self.packs.get(key)
        if members is None:
            self._ended(key, _metrics(trial.last_result or {}), _fetcher(self.storage, key), error)
            return
        for member in members:  # a member's last metrics: from the last result that carried it
            self._ended(member, self.latest.get(member, {}), _fetcher(self.storage, member), error)

    def _ended(self, key: str, last: dict[str, float], fetch: Any, error: str) -> None:
        if key in self.user_errors:
            error = self.user_errors[key]
        elif error:
            self.errors[key] = error
        if self.fault and not error and not last.get("epoch"):
            return  # it ended on the fault without an epoch: left for --resume, marked interrupted
        if last:
            self.latest[key] = last
        planned = self.trials[key].epochs
        self.statuses[key] = TrialStatus.ERROR if error else trial_status([last] if last else [], planned)
        tags = {Tag.EPOCHS_RUN: str(self.epochs_run[key])}
        line = _error_line(error) if error else ""
        self.writer.trial_ended(key, last=last or None, fetch_checkpoint=fetch, error=line, tags=tags)
        self.ended.add(key)

    def step(self, final: bool = False) -> None:
        if self.writer.abandoned and not self.stopping:  # the lease was taken over: stop the trials, once
            self.stopping = True
            self.interrupt()
        if not final:  # at the end (also after an error) the failure is raised by the flush that follows
            self.writer.raise_if_failed()
        epochs = self.progress.console.is_terminal  # in a log, one line per change of counts, not per epoch
        line = progress_line(self.stage, self.statuses, self.latest, self.best, epochs=epochs, eta_s=self.eta_s())
        self.progress.show(line)

    def unrecorded(self, grace_s: float) -> list[str]:
        """A line for the trials this driver saw end whose end a hurried writer (a signal's grace period, `grace_s`)
        could not write: MLflow does not count them yet; their checkpoints hold them for `--resume`."""
        late = Counter(s for k, s in self.statuses.items() if k in self.ended and self.writer.status(k) != s)
        if not late:
            return []
        counts = ", ".join(f"{n} {status}" for status, n in sorted(late.items()))
        return [
            f"{_trials_n(late.total())} that ended ({counts}) could not be recorded in MLflow within the "
            f"{grace_s:.0f}s grace period: their checkpoints hold them and `--resume` records them"
        ]

    def digest(self, log_file: Path | None) -> list[str]:
        """One line per distinct error (how many trials, which), the full texts written to `log_file`."""
        if log_file is not None and (self.errors or self.retried):
            with log_file.open("a") as fh:
                for key, text in sorted(self.retried.items()):
                    fh.write(f"=== {key} (retried)\n{text}\n")
                for key, text in sorted(self.errors.items()):
                    fh.write(f"=== {key}\n{text}\n")
        lines = []
        for what, errors in (("retried from a checkpoint after", self.retried), ("failed", self.errors)):
            by_line: dict[str, list[str]] = {}
            for key, text in sorted(errors.items()):
                by_line.setdefault(_error_line(text), []).append(key)
            for line, keys in by_line.items():
                lines.append(f"{_trials_n(len(keys))} {what}: {line} ({listed(keys, 4)})")
        return lines
