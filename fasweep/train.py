"""One trial, no Ray: `train(TrialConfig)` trains a net with its learning rule and emits per-epoch metrics.

Seeds everything from `train.seed` (bitwise deterministic on CPU), keeps the data on the device, and ends a
trial whose loss turns non-finite with status `diverged` (the last good weights and the history kept). Given a
checkpoint folder (a path or URI, see `fasweep.checkpoints`), it writes the checkpoint a resumed trial continues
from exactly (and a torch-free `history.json` beside it) straight into that folder, in the epochs its
`CheckpointPolicy` makes due (always the last and a diverged one), keeping the newest `keep`; an epoch that is not
due serializes nothing.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fasweep.checkpoints import CheckpointFolder, CheckpointPolicy
from fasweep.config import TrainConfig, TrialConfig, flatten
from fasweep.data import TensorData, load_data
from fasweep.errors import UserError
from fasweep.models import build_model, layer_group, parse_layers, resolve_arch
from fasweep.nn import alignment, optimizer_step

PROBE_SIZE = 256
# fields a resumed trial may change; any other difference means a different trial
_RESUMABLE = {"train.epochs", "train.device", "train.alignment_every", "train.compile"}

EpochCallback = Callable[[dict[str, float], str | None], None]  # (metrics, the checkpoint written after it or None)


@dataclass
class TrialResult:
    """What a trial ends with: its status, every epoch's metrics, the last epoch's."""

    status: Literal["finished", "diverged"]
    history: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)


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


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """adam | sgd | nesterov over the trainable params; L2 (weight decay) per group on the layers' weights.

    Groups: `conv` (Conv, FixConv), `untied`, `dense`; biases and batch-norm params get no L2. Adam is torch's
    fused kernel (one pass over each parameter and its state; on the CPU 10x the single-tensor loop's speed).
    """
    l2 = cfg.l2 if isinstance(cfg.l2, dict) else dict.fromkeys(("conv", "untied", "dense"), cfg.l2)
    groups: dict[float, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module, _, pname = name.rpartition(".")
        group = layer_group(module) if pname == "weight" else None
        groups.setdefault(l2.get(group, 0.0) if group else 0.0, []).append(param)
    params = [{"params": ps, "weight_decay": wd} for wd, ps in groups.items()]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, fused=True)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.optimizer == "nesterov")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch lr schedule: constant; cosine to 0 over the epochs; step: x0.1 at 1/2 and 3/4 of the epochs."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.schedule == "step":
        milestones = sorted({max(1, cfg.epochs // 2), max(1, 3 * cfg.epochs // 4)})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


class Checkpointer:
    """One trial's checkpoints: `save` writes a `state()` dict to its folder when the policy makes it due."""

    def __init__(self, location: str | Path, policy: CheckpointPolicy, epoch: int) -> None:
        self.folder = CheckpointFolder(location)
        self.policy = policy
        self.last = (epoch, time.monotonic())  # the epoch of the latest checkpoint (or the resumed one), and when

    def save(self, epoch: int, final: bool, state: Callable[[], dict[str, Any]]) -> str | None:
        """Write `state()` as the checkpoint after `epoch` if due (`final`: the trial's last epoch); where, or None."""
        since, at = self.last
        if not self.policy.due(epoch - since, time.monotonic() - at, final=final):
            return None
        saved, buffer = state(), io.BytesIO()
        torch.save(saved, buffer)
        history = json.dumps(saved["history"]).encode()
        where = self.folder.write(epoch, history, buffer.getbuffer(), self.policy.keep)
        self.last = (epoch, time.monotonic())
        return where


def load_checkpoint(path: Path, config: TrialConfig) -> dict[str, Any]:
    """Read a checkpoint to resume `config` from; a missing file or a different trial is a UserError."""
    if not Path(path).is_file():
        raise UserError.field("resume_from", str(path), "an existing fasweep checkpoint file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved, now = flatten(state["config"]), flatten(config.model_dump())
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k) and k not in _RESUMABLE)
    if changed:
        raise UserError.field("resume_from", str(path), f"a checkpoint of this trial (it differs in {changed})")
    return state


def use_channels_last(device: torch.device, input_shape: tuple[int, ...], asked: bool | None = None) -> bool:
    """Whether image data (C, H, W) and its convolutions go channels_last: as `asked`, by default (None) on CUDA."""
    return len(input_shape) == 3 and (device.type == "cuda" if asked is None else asked)


class _Trial:
    """The mutable state of one trial: data, model, optimizer, RNGs; `epoch()` runs one and returns metrics.

    bf16 autocast, `torch.compile` and channels_last run on the CPU as on CUDA (`channels_last`: see
    `use_channels_last`).
    """

    def __init__(self, config: TrialConfig, channels_last: bool | None = None) -> None:
        self.config = config
        cfg = config.train
        self.device = pick_device(cfg.device)
        self.cuda = self.device.type == "cuda"
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)
        self.data: TensorData = load_data(config.data, device=str(self.device), seed=cfg.seed)
        self.model = build_model(config.model, config.feedback, self.data.input_shape, self.data.num_outputs, cfg.seed)
        self.model.to(self.device)
        self.channels_last = use_channels_last(self.device, self.data.input_shape, channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.net: nn.Module = torch.compile(self.model) if cfg.compile else self.model
        self.loss_fn = make_loss(cfg.loss, self.data.task)
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.probe = next(self.data.batches("test", PROBE_SIZE, shuffle=False))
        self.history: list[dict[str, float]] = []

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(self.device.type, torch.bfloat16) if self.config.train.bf16 else contextlib.nullcontext()

    def _inputs(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, ...]]:
        for x, y in batches:
            yield (x.contiguous(memory_format=torch.channels_last) if self.channels_last else x), y

    def _score(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (out.argmax(1) == y).sum() if self.data.task == "classification" else y.new_zeros((), dtype=torch.long)

    def _fit(self) -> tuple[dict[str, float], bool]:
        """One pass over the training data; stops before the step at a non-finite loss (returns diverged)."""
        cfg = self.config.train
        self.net.train()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        count, diverged = 0, False
        batches = self.data.batches("train", cfg.batch_size, shuffle=True, generator=self.generator)
        for x, y in self._inputs(batches):
            with self._autocast():
                out = self.net(x)
            loss = self.loss_fn(out.float(), y)
            if not torch.isfinite(loss):
                diverged, loss_sum = True, loss_sum + loss.detach() * len(y)
                count += len(y)
                break
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer_step(self.model, self.optimizer, batch_manhattan=cfg.batch_manhattan, weight_clip=cfg.weight_clip)
            loss_sum += loss.detach() * len(y)
            correct += self._score(out.detach(), y)
            count += len(y)
        metrics = {"train_loss": float(loss_sum) / max(count, 1)}
        if self.data.task == "classification":
            metrics["train_acc"] = float(correct) / max(count, 1)
        return metrics, diverged

    @torch.no_grad()
    def _evaluate(self, split: Literal["val", "test"]) -> dict[str, float]:
        self.net.eval()
        loss_sum, correct, count = 0.0, 0, 0
        for x, y in self._inputs(self.data.batches(split, 1024, shuffle=False)):
            with self._autocast():
                out = self.net(x).float()
            loss_sum += float(self.loss_fn(out, y)) * len(y)
            correct += int(self._score(out, y))
            count += len(y)
        metrics = {f"{split}_loss": loss_sum / max(count, 1)}
        if self.data.task == "classification":
            metrics[f"{split}_acc"] = correct / max(count, 1)
        return metrics

    def epoch(self, number: int) -> dict[str, float]:
        """Train one epoch, evaluate, measure alignment when due; the epoch's metrics (history appended)."""
        cfg = self.config.train
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        metrics, diverged = self._fit()
        if not diverged:
            self.scheduler.step()
        if self.data.x_val is not None:
            metrics |= self._evaluate("val")
        metrics |= self._evaluate("test")
        if cfg.alignment_every and number % cfg.alignment_every == 0 and not diverged:
            metrics |= alignment(self.model, *self.probe, self.loss_fn)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        metrics = {"epoch": float(number), **metrics, "lr": float(lr), "diverged": float(diverged)}
        metrics["epoch_time_s"] = time.perf_counter() - start
        self.history.append(metrics)
        return metrics

    def state(self, number: int, status: str) -> dict[str, Any]:
        """Everything a resumed trial needs to continue exactly after epoch `number`."""
        return {
            "epoch": number,
            "status": status,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.cuda else [],
                "generator": self.generator.get_state(),
            },
            "history": self.history,
            "config": self.config.model_dump(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Load a `state()` dict (model, optimizer, schedule, every RNG, history)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.cuda and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.generator.set_state(state["rng"]["generator"])
        self.history = list(state["history"])


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
    parse_layers(resolve_arch(config.model.arch))  # a bad arch fails before the data set loads
    state = load_checkpoint(Path(resume_from), config) if resume_from is not None else None
    if state is not None and state["status"] == "diverged":
        history = list(state["history"])
        return TrialResult("diverged", history, history[-1])
    trial = _Trial(config, channels_last)
    try:
        if state is not None:
            trial.restore(state)
        start = len(trial.history)
        saver = Checkpointer(checkpoint_dir, checkpointing, start) if checkpoint_dir is not None else None
        status: Literal["finished", "diverged"] = "finished"
        for number in range(start + 1, config.train.epochs + 1):
            metrics = trial.epoch(number)
            status = "diverged" if metrics["diverged"] else "finished"
            final = status == "diverged" or number == config.train.epochs
            saved = saver.save(number, final, partial(trial.state, number, status)) if saver is not None else None
            if on_epoch is not None:
                on_epoch(dict(metrics), saved)
            if status == "diverged":
                break
        history = trial.history
        return TrialResult(status, history, dict(history[-1]) if history else {})
    finally:
        cuda = trial.cuda
        del trial
        if cuda:  # several trials share one GPU: give its memory back now
            gc.collect()
            torch.cuda.empty_cache()
