"""Training, no Ray: `train(TrialConfig)` trains one trial; `run_trials` is the loop of every trainer.

`run_trials` trains K >= 1 trials (`fasweep.trial.TrialState`) through one `Nets`: a trial alone (`Alone`, its own
`nn.Module`) or a pack's members (`fasweep.packed.train.PackedNets`, one fused model). Each trial is seeded from
its `train.seed` (bitwise deterministic on CPU), the data stays on the device, and a trial whose loss turns
non-finite stops before that step, keeps its last good weights (evaluated as the others) and its history, and ends
`diverged` while the others go on. Given a checkpoint folder (a path or URI, see `fasweep.checkpoints`), a trial
writes the checkpoint a resumed trial continues from exactly (and a torch-free `history.json` beside it) straight
into that folder, in the epochs its `CheckpointPolicy` makes due (always the last and a diverged one), keeping the
newest `keep`; an epoch that is not due serializes nothing. bf16 autocast, `torch.compile` and channels_last run on
the CPU as on CUDA (`channels_last`: see `use_channels_last`).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import time
from collections.abc import Callable, Sequence
from functools import partial, wraps
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from fasweep.config import CheckpointPolicy, TrialConfig
from fasweep.data import TensorData, load_data
from fasweep.errors import UserError
from fasweep.models import layers_of
from fasweep.nn import alignment, optimizer_step, step_overflows
from fasweep.trial import Checkpoint, Checkpointer, Status, TrialResult, TrialState, ended, load_checkpoint

PROBE_SIZE = 256
EVAL_BATCH = 1024

EpochCallback = Callable[[dict[str, float], str | None], None]  # (metrics, the checkpoint written after it or None)
TrialsCallback = Callable[[int, dict[str, float], str | None], None]  # (trial index, metrics, its checkpoint or None)
LossFn = Callable[[Tensor, Tensor], Tensor]


def pick_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without CUDA is a UserError."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError.field("train.device", name, "auto or cpu (no CUDA device is visible here)")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def make_loss(name: str, task: str) -> nn.Module:
    """cross_entropy | hinge (multi-class, nn.MultiMarginLoss) for classification; MSE for regression."""
    if task == "regression":
        if name == "hinge":
            raise UserError.field("train.loss", name, "cross_entropy (regression data sets always use MSE)")
        return nn.MSELoss()
    return nn.MultiMarginLoss() if name == "hinge" else nn.CrossEntropyLoss()


def use_channels_last(device: torch.device, input_shape: tuple[int, ...], asked: bool | None = None) -> bool:
    """Whether image data (C, H, W) and its convolutions go channels_last: as `asked`, by default (None) on CUDA."""
    return len(input_shape) == 3 and (device.type == "cuda" if asked is None else asked)


class Nets(Protocol):
    """The nets of the trials still training, run as one: outputs and grads carry a leading trial axis (K)."""

    members: list[TrialState]

    def inputs(self, xs: list[Tensor]) -> Tensor:
        """One batch per member -> the input of `forward`."""

    def shared(self, x: Tensor) -> Tensor:
        """One batch for every member (evaluation) -> the input of `forward`."""

    def forward(self, x: Tensor) -> Tensor:
        """The members' outputs, (K, N, outputs)."""

    def mode(self, training: bool) -> None: ...

    def zero_grad(self) -> None: ...

    def step(self) -> None:
        """Every member's optimizer step (`fasweep.nn.optimizer_step`) from the grads of the last backward."""

    def overflows(self) -> list[bool]:
        """Per member, whether its next step's scale overflows float32 (`fasweep.nn.step.update_overflows`)."""

    def leave(self, keep: list[int]) -> None:
        """Only the members `keep` go on; the others are synced first."""

    def sync(self, index: int) -> None:
        """Member `index`'s net and `optimizer_state` from the nets (before its checkpoint, or when it leaves)."""

    def alignment(self, x: Tensor, y: Tensor, loss_fn: LossFn, due: list[int]) -> list[dict[str, float]]:
        """`fasweep.nn.alignment` on the probe batch for the members `due` (indices)."""

    def alone(self, members: list[TrialState]) -> Nets:
        """Nets of members that left (diverged) with their last good weights, to evaluate them."""


class Alone:
    """`Nets` of one trial: its own `nn.Module` on the device (compiled if asked) and its torch optimizer."""

    def __init__(self, member: TrialState, channels_last: bool) -> None:
        self.members = [member]
        self.model, self.optimizer, self.cfg = member.model, member.optimizer, member.config.train
        self.channels_last = channels_last
        self.net: nn.Module = torch.compile(self.model) if self.cfg.compile else self.model

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def inputs(self, xs: list[Tensor]) -> Tensor:
        return self._layout(xs[0])

    def shared(self, x: Tensor) -> Tensor:
        return self._layout(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).unsqueeze(0)

    def mode(self, training: bool) -> None:
        self.net.train(training)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        cfg = self.cfg
        optimizer_step(self.model, self.optimizer, batch_manhattan=cfg.batch_manhattan, weight_clip=cfg.weight_clip)

    def overflows(self) -> list[bool]:
        return [step_overflows(self.optimizer)]

    def leave(self, keep: list[int]) -> None:
        if not keep:
            self.sync(0)
            self.members = []

    def sync(self, index: int) -> None:
        self.members[index].optimizer_state = self.optimizer.state_dict()

    def alignment(self, x: Tensor, y: Tensor, loss_fn: LossFn, due: list[int]) -> list[dict[str, float]]:
        return [alignment(self.model, x, y, loss_fn) for _ in due]

    def alone(self, members: list[TrialState]) -> Alone:
        nets = copy.copy(self)
        nets.members = members
        return nets


class _Loop:
    """The epochs of the trials in `nets` (they share data, batch size, loss, bf16: `fasweep.packing`)."""

    def __init__(self, nets: Nets, data: TensorData) -> None:
        self.nets, self.data = nets, data
        cfg = nets.members[0].config.train
        self.cfg, self.device = cfg, nets.members[0].device
        self.loss_fn = make_loss(cfg.loss, data.task)
        self.probe = next(data.batches("test", PROBE_SIZE, shuffle=False))

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(self.device.type, torch.bfloat16) if self.cfg.bf16 else contextlib.nullcontext()

    def _losses(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Each member's loss, by the very call a trial alone makes, and their sum (what backward starts from).

        One member: its loss itself, through views only (a trial alone runs the kernels it would on its own)."""
        if len(out) == 1:
            loss = self.loss_fn(out.squeeze(0), y.squeeze(0))
            return loss.unsqueeze(0), loss
        losses = torch.stack([self.loss_fn(o, t) for o, t in zip(out, y, strict=True)])
        return losses, losses.sum()

    def _score(self, out: Tensor, y: Tensor) -> Tensor:
        if self.data.task != "classification":
            return torch.zeros(len(out), dtype=torch.long, device=out.device)
        return (out.argmax(-1) == y).sum(-1)

    def _metrics(self, split: str, loss_sum: float, correct: float, count: int) -> dict[str, float]:
        metrics = {f"{split}_loss": loss_sum / max(count, 1)}
        if self.data.task == "classification":
            metrics[f"{split}_acc"] = correct / max(count, 1)
        return metrics

    def _fit(self) -> dict[TrialState, tuple[dict[str, float], bool]]:
        """One pass over the training data for every member; a member whose loss is non-finite, or whose update
        would overflow float32 (an lr torch cannot apply: `Nets.overflows`), leaves before that step (the batch
        counts in its loss, not in its accuracy) and is marked diverged."""
        nets, cfg = self.nets, self.cfg
        nets.mode(True)
        batches = [
            self.data.batches("train", cfg.batch_size, shuffle=True, generator=m.generator) for m in nets.members
        ]
        k = len(nets.members)
        loss_sum = torch.zeros(k, device=self.device, dtype=torch.float64)
        correct = torch.zeros(k, device=self.device, dtype=torch.long)
        count = 0
        results: dict[TrialState, tuple[dict[str, float], bool]] = {}
        for _ in range(math.ceil(self.data.x_train.shape[0] / cfg.batch_size)):
            pairs = [next(b) for b in batches]
            x = nets.inputs([p[0] for p in pairs])
            y = pairs[0][1].unsqueeze(0) if len(pairs) == 1 else torch.stack([p[1] for p in pairs])
            with self._autocast():
                out = nets.forward(x)
            out = out.float()
            losses, total = self._losses(out, y)
            n = y.shape[1]
            count += n
            nets.zero_grad()
            overflow = nets.overflows()
            if bool(torch.isfinite(total)) and not any(overflow):  # a finite sum: every member's loss is finite
                total.backward()
            else:
                finite = torch.isfinite(losses) & ~torch.tensor(overflow, device=self.device)
                keep = finite.nonzero().flatten().tolist()
                for i in (~finite).nonzero().flatten().tolist():
                    bad = float(loss_sum[i] + losses[i].detach() * n)
                    results[nets.members[i]] = (self._metrics("train", bad, float(correct[i]), count), True)
                if keep:
                    losses[keep].sum().backward()
                nets.leave(keep)
                if not keep:
                    break
                index = torch.tensor(keep, device=self.device)
                loss_sum, correct, losses = loss_sum[index], correct[index], losses[index]
                out, y = out[index], y[index]
                batches = [batches[i] for i in keep]
            nets.step()
            loss_sum += losses.detach() * n
            correct += self._score(out.detach(), y)
        for i, m in enumerate(nets.members):
            results[m] = (self._metrics("train", float(loss_sum[i]), float(correct[i]), count), False)
        return results

    @torch.no_grad()
    def _evaluate(self, nets: Nets, split: Literal["val", "test"]) -> list[dict[str, float]]:
        nets.mode(False)
        k = len(nets.members)
        loss_sum, correct, count = [0.0] * k, [0] * k, 0
        for x, y in self.data.batches(split, EVAL_BATCH, shuffle=False):
            with self._autocast():
                out = nets.forward(nets.shared(x)).float()
            losses = self._losses(out, y.expand(k, *y.shape))[0].tolist()
            scores = self._score(out, y).tolist()
            for i in range(k):
                loss_sum[i] += losses[i] * len(y)
                correct[i] += scores[i]
            count += len(y)
        return [self._metrics(split, loss_sum[i], correct[i], count) for i in range(k)]

    def epoch(self) -> list[tuple[TrialState, dict[str, float]]]:
        """Every member's next epoch: train, evaluate, alignment where due; (member, metrics row) in order."""
        start = time.perf_counter()
        starting = [(m, len(m.history) + 1, m.lr) for m in self.nets.members]
        fit = self._fit()
        for m in self.nets.members:
            m.step_schedule()
        diverged = [m for m, _, _ in starting if fit[m][1]]
        evaluated = {m: dict(fit[m][0]) for m, _, _ in starting}
        splits: list[Literal["val", "test"]] = (["val"] if self.data.x_val is not None else []) + ["test"]
        groups = [self.nets] if self.nets.members else []
        if diverged:  # their last good weights
            groups.append(self.nets.alone(diverged))
        for nets in groups:
            for split in splits:
                for m, metrics in zip(nets.members, self._evaluate(nets, split), strict=True):
                    evaluated[m] |= metrics
        number = {m: n for m, n, _ in starting}
        members = self.nets.members
        due = [i for i, m in enumerate(members) if (every := m.config.train.alignment_every) and number[m] % every == 0]
        if due:
            for i, metrics in zip(due, self.nets.alignment(*self.probe, self.loss_fn, due), strict=True):
                evaluated[members[i]] |= metrics
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        rows = []
        for m, n, lr in starting:
            row = {"epoch": float(n), **evaluated[m], "lr": lr, "diverged": float(m in diverged)}
            row["epoch_time_s"] = elapsed
            m.history.append(row)
            rows.append((m, row))
        return rows

    def state(self, member: TrialState, status: Status) -> Checkpoint:
        """A member's checkpoint, synced from the nets while it is in them."""
        if member in self.nets.members:
            self.nets.sync(self.nets.members.index(member))
        return member.state(status)

    def retire_done(self) -> None:
        """Members whose epochs are all run leave the nets."""
        members = self.nets.members
        if any(m.done for m in members):
            self.nets.leave([i for i, m in enumerate(members) if not m.done])


def _gives_gpu_memory_back(fn: Callable[..., list[TrialResult]]) -> Callable[..., list[TrialResult]]:
    """`fn`, after which (its nets and data gone) the memory torch caches on the GPU is given back: several trials
    share one GPU."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> list[TrialResult]:
        try:
            return fn(*args, **kwargs)
        finally:
            if torch.cuda.is_initialized():
                gc.collect()
                torch.cuda.empty_cache()

    return wrapper


@_gives_gpu_memory_back
def run_trials(
    configs: Sequence[TrialConfig],
    make_nets: Callable[[list[TrialState], bool], Nets] | None,
    *,
    checkpoint_dirs: Sequence[str | Path | None],
    checkpointing: CheckpointPolicy,
    resume_from: Sequence[Path | None],
    on_epoch: TrialsCallback | None,
    channels_last: bool | None,
) -> list[TrialResult]:
    """Train `configs` (one trial with `make_nets` None: `Alone`; else a pack, see `fasweep.packed.train_pack`)
    epoch by epoch, each from `resume_from[k]` and checkpointed into `checkpoint_dirs[k]` by its own epochs and
    clock under `checkpointing`; `on_epoch(k, metrics, checkpoint or None)` after each epoch of trial k."""
    states = [load_checkpoint(Path(r), c) if r is not None else None for c, r in zip(configs, resume_from, strict=True)]
    results = {k: result for k, state in enumerate(states) if (result := ended(state)) is not None}
    device = pick_device(configs[0].train.device)
    data = load_data(configs[0].data, device=str(device), seed=configs[0].train.seed)
    layout = use_channels_last(device, data.input_shape, channels_last)
    members = {
        k: TrialState(configs[k], data, device, states[k], alone=make_nets is None, channels_last=layout)
        for k in range(len(configs))
        if k not in results
    }
    index = {m: k for k, m in members.items()}
    dirs = {m: d for k, m in members.items() if (d := checkpoint_dirs[k]) is not None}
    savers = {m: Checkpointer(d, checkpointing, len(m.history)) for m, d in dirs.items()}
    status: dict[TrialState, Status] = dict.fromkeys(members.values(), "finished")
    running = [m for m in members.values() if not m.done]
    if running:
        nets = Alone(running[0], layout) if make_nets is None else make_nets(running, layout)
        loop = _Loop(nets, data)
        while loop.nets.members:
            for m, metrics in loop.epoch():
                status[m] = "diverged" if metrics["diverged"] else "finished"
                saver = savers.get(m)
                saved = saver.save(len(m.history), m.done, partial(loop.state, m, status[m])) if saver else None
                if on_epoch is not None:
                    on_epoch(index[m], dict(metrics), saved)
            loop.retire_done()
    for k, m in members.items():
        results[k] = TrialResult(status[m], m.history, dict(m.history[-1]) if m.history else {})
    return [results[k] for k in range(len(configs))]


def train(
    config: TrialConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    checkpointing: CheckpointPolicy = CheckpointPolicy(),
    resume_from: Path | None = None,
    on_epoch: EpochCallback | None = None,
    channels_last: bool | None = None,
) -> TrialResult:
    """Train one trial (from the checkpoint file `resume_from`), writing its checkpoints to the folder
    `checkpoint_dir` as `checkpointing` says; `on_epoch(metrics, checkpoint or None)` after every epoch;
    `channels_last`: see `use_channels_last`. See the module docstring."""
    layers_of(config.model.arch)  # a bad arch fails before the data set loads
    callback = None if on_epoch is None else lambda _, metrics, saved: on_epoch(metrics, saved)
    return run_trials(
        [config],
        None,
        checkpoint_dirs=[checkpoint_dir],
        checkpointing=checkpointing,
        resume_from=[resume_from],
        on_epoch=callback,
        channels_last=channels_last,
    )[0]
