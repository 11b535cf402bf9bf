"""One trial's state and its checkpoint: the contract `fasweep.train.train` and `fasweep.packed.train_pack` share.

`TrialState` is what a trial carries from epoch to epoch: its config, net, optimizer, lr schedule, data-order
generator, RNGs and history. It is seeded from `train.seed` alike whether the trial trains alone or as a pack's
member (the same W, B and masks, the same batches), and `state()` gives its `Checkpoint`, the one schema both
trainers write and resume from: a trial continues from it alone or packed. `load_checkpoint` reads one back
(refusing another trial's), `ended` is the shortcut of a trial resumed after it diverged (nothing left to run),
and `Checkpointer` writes a checkpoint and its torch-free `history.json` into the trial's folder
(`fasweep.checkpoints`) in the epochs its `CheckpointPolicy` makes due.
"""

from __future__ import annotations

import io
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

import torch
from torch import nn

from fasweep.checkpoints import CheckpointFolder
from fasweep.config import CheckpointPolicy, TrainConfig, TrialConfig, flatten
from fasweep.data import TensorData
from fasweep.datasets import DATASETS
from fasweep.errors import UserError
from fasweep.models import build_model, layer_group, model_bytes

Status = Literal["finished", "diverged"]
# fields a resumed trial may change; any other difference means a different trial
_RESUMABLE = {"train.epochs", "train.device", "train.alignment_every", "train.compile"}


@dataclass
class TrialResult:
    """What a trial ends with: its status, every epoch's metrics, the last epoch's."""

    status: Status
    history: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)


class Checkpoint(TypedDict):
    """A trial's `checkpoint.pt`: everything it needs to continue exactly after `epoch`, alone or in a pack."""

    epoch: int
    status: Status
    model: dict[str, torch.Tensor]  # the trial's own net's state_dict
    optimizer: dict[str, Any]  # its torch optimizer's state_dict
    scheduler: dict[str, Any]
    rng: dict[str, Any]  # torch: the CPU RNG; cuda: every CUDA device's RNG; generator: the data order's
    history: list[dict[str, float]]  # one metrics row per epoch run
    config: dict[str, Any]  # its TrialConfig, dumped


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


def optimizer_moments(cfg: TrainConfig) -> int:
    """Tensors the optimizer keeps per parameter: Adam's two moments, SGD's momentum buffer (none without one)."""
    return 2 if cfg.optimizer == "adam" else int(cfg.momentum != 0)


@dataclass(frozen=True)
class Footprint:
    """What one trial's net holds, in bytes: its state (weights, biases, feedback matrices, buffers), the gradients
    of its trainable parameters and the optimizer's moments of them."""

    state: int
    gradients: int
    moments: int

    @property
    def checkpoint(self) -> int:
        """A checkpoint's size: the state and the optimizer's moments (`Checkpoint`)."""
        return self.state + self.moments

    @property
    def memory(self) -> int:
        """What training holds at least (activations aside): state, gradients and moments."""
        return self.state + self.gradients + self.moments


def footprint(config: TrialConfig) -> Footprint | None:
    """A trial's `Footprint`, measured on the meta device (nothing is allocated, nothing is loaded); None for a data
    set whose shape is known only once decoded (an image folder, a user's data set) or a user's net that cannot be
    built on the meta device."""
    dataset = DATASETS.get(config.data.name)
    if dataset is None or dataset.input_shape is None or dataset.outputs is None:
        return None
    try:
        state, trainable = model_bytes(config.model, config.feedback, dataset.input_shape, dataset.outputs)
    except Exception:  # user code that needs real tensors: no estimate (the trial reports its own errors)
        return None
    return Footprint(state, trainable, trainable * optimizer_moments(config.train))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch lr schedule: constant; cosine to 0 over the epochs; step: x0.1 at 1/2 and 3/4 of the epochs."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.schedule == "step":
        milestones = sorted({max(1, cfg.epochs // 2), max(1, 3 * cfg.epochs // 4)})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def nothing_left(history: list[dict[str, float]], epochs: int) -> bool:
    """Whether a trial with this history has no epoch left to run: all `epochs` run, or diverged."""
    return len(history) >= epochs or bool(history and history[-1]["diverged"])


class TrialState:
    """One trial's state (see the module docstring), built from its seed and, when resumed, its `Checkpoint`.

    `alone`: the trial runs its own net, which lives on `device` (laid out `channels_last` if asked) and draws
    from torch's global RNGs (dropout, batch_random magnitudes). Otherwise (a pack's member) the net stays on the
    CPU as the checkpoint's format, and `draws`, a generator of its own, stands in for the global RNG of its
    device. `optimizer_state` is the optimizer's state_dict as of the last `sync` of whoever steps it.
    """

    def __init__(
        self,
        config: TrialConfig,
        data: TensorData,
        device: torch.device,
        checkpoint: Checkpoint | None,
        *,
        alone: bool,
        channels_last: bool = False,
    ) -> None:
        cfg = config.train
        self.config, self.device = config, device
        torch.manual_seed(cfg.seed)  # the same W, B and masks alone and in a pack
        self.generator = torch.Generator(device).manual_seed(cfg.seed)
        self.model = build_model(config.model, config.feedback, data.input_shape, data.num_outputs, cfg.seed)
        if alone:
            self.model.to(device)
            if channels_last:
                self.model.to(memory_format=torch.channels_last)
        cuda = device.type == "cuda"
        self.cuda_index = (device.index or torch.cuda.current_device()) if cuda else 0
        rng_cpu, self.rng_cuda = torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else []
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.history: list[dict[str, float]] = []
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            rng_cpu = checkpoint["rng"]["torch"]
            self.rng_cuda = list(checkpoint["rng"]["cuda"]) or self.rng_cuda
            self.generator.set_state(checkpoint["rng"]["generator"])
            self.history = list(checkpoint["history"])
        self.cpu_rng = torch.default_generator if alone else torch.Generator()
        self.cpu_rng.set_state(rng_cpu)
        self.cuda_rng: torch.Generator | None = None
        if cuda:
            self.cuda_rng = torch.cuda.default_generators[self.cuda_index] if alone else torch.Generator(device)
            self.cuda_rng.set_state(self.rng_cuda[self.cuda_index])
        self.draws = self.cpu_rng if self.cuda_rng is None else self.cuda_rng
        self.optimizer_state: dict[str, Any] = {}

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def done(self) -> bool:
        return nothing_left(self.history, self.config.train.epochs)

    def step_schedule(self) -> None:
        """The lr schedule's epoch step (a pack member's optimizer never steps itself: the pack's does)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of")
            self.scheduler.step()

    def state(self, status: Status) -> Checkpoint:
        """Its checkpoint after its last epoch (net and `optimizer_state` as last synced)."""
        cuda = list(self.rng_cuda)
        if self.cuda_rng is not None:
            cuda[self.cuda_index] = self.cuda_rng.get_state()
        return {
            "epoch": len(self.history),
            "status": status,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": self.cpu_rng.get_state(), "cuda": cuda, "generator": self.generator.get_state()},
            "history": self.history,
            "config": self.config.model_dump(),
        }


def load_checkpoint(path: Path, config: TrialConfig) -> Checkpoint:
    """Read a checkpoint to resume `config` from; a missing file or a different trial is a UserError."""
    if not Path(path).is_file():
        raise UserError.field("resume_from", str(path), "an existing fasweep checkpoint file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved, now = flatten(state["config"]), flatten(config.model_dump())
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k) and k not in _RESUMABLE)
    if changed:
        raise UserError.field("resume_from", str(path), f"a checkpoint of this trial (it differs in {changed})")
    return state


def ended(checkpoint: Checkpoint | None) -> TrialResult | None:
    """The result of a trial resumed from the checkpoint it diverged in (nothing to run); None for any other."""
    if checkpoint is None or checkpoint["status"] != "diverged":
        return None
    history = list(checkpoint["history"])
    return TrialResult("diverged", history, history[-1])


class Checkpointer:
    """One trial's checkpoints: `save` writes a `Checkpoint` to its folder when the policy makes it due."""

    def __init__(self, location: str | Path, policy: CheckpointPolicy, epoch: int) -> None:
        self.folder = CheckpointFolder(location)
        self.policy = policy
        self.last = (epoch, time.monotonic())  # the epoch of the latest checkpoint (or the resumed one), and when

    def save(self, epoch: int, final: bool, state: Callable[[], Checkpoint]) -> str | None:
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
