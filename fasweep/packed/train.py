"""`train_pack(configs)`: K compatible trials trained as one fused model in one process (no Ray inside).

Each member is the trial `fasweep.train.train` would run: seeded from its own `train.seed` (weights, B and
masks drawn exactly as alone), its own data order and augmentation (a generator per seed), optimizer state,
lr schedule, history and status, and it writes the checkpoint and `history.json` that `train()` writes for
that trial, so either trainer resumes it. A member whose loss turns non-finite stops before that step, leaves
the pack with its last good weights (evaluated, as alone) and ends `diverged`; the others go on.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from fasweep.checkpoints import CheckpointPolicy
from fasweep.config import TrialConfig
from fasweep.data import TensorData, load_data
from fasweep.errors import UserError
from fasweep.models import build_model
from fasweep.packed.group import not_packable, pack_differences
from fasweep.packed.net import PackedNet
from fasweep.packed.optim import StackedOptimizer
from fasweep.train import (
    PROBE_SIZE,
    Checkpointer,
    TrialResult,
    load_checkpoint,
    make_loss,
    make_optimizer,
    make_scheduler,
    pick_device,
    use_channels_last,
)

PackEpochCallback = Callable[[int, dict[str, float], str | None], None]  # (member, metrics, its checkpoint or None)
Status = Literal["finished", "diverged"]


class _Member:
    """One trial of a pack: config, its own net (CPU: initial weights, checkpoint format), torch optimizer and
    schedule (hyperparameters and lr), data-order generator, global-RNG stand-in, history."""

    def __init__(
        self, index: int, config: TrialConfig, data: TensorData, device: torch.device, state: dict[str, Any] | None
    ) -> None:
        cfg = config.train
        self.index, self.config, self.device = index, config, device
        torch.manual_seed(cfg.seed)  # as train(): the same W, B and masks as the trial alone
        self.generator = torch.Generator(device).manual_seed(cfg.seed)
        self.model = build_model(config.model, config.feedback, data.input_shape, data.num_outputs, cfg.seed)
        rng_cpu = torch.get_rng_state()
        self.rng_cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else []
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.history: list[dict[str, float]] = []
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            rng_cpu = state["rng"]["torch"]
            self.rng_cuda = list(state["rng"]["cuda"]) or self.rng_cuda
            self.generator.set_state(state["rng"]["generator"])
            self.history = list(state["history"])
        self.rng_cpu = rng_cpu
        self.cuda_index = (device.index or torch.cuda.current_device()) if device.type == "cuda" else 0
        # what draws from the global RNG in a trial alone (batch_random magnitudes) draws from this
        self.draws = torch.Generator(device)
        self.draws.set_state(self.rng_cuda[self.cuda_index] if device.type == "cuda" else rng_cpu)
        self.optimizer_state: dict[str, Any] = {}  # its state_dict, synced from the pack (`_Pack.sync`)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def done(self) -> bool:
        return len(self.history) >= self.config.train.epochs or bool(self.history and self.history[-1]["diverged"])

    def step_schedule(self) -> None:
        with warnings.catch_warnings():  # its optimizer never steps itself: the stacked one does
            warnings.filterwarnings("ignore", message="Detected call of")
            self.scheduler.step()

    def state(self, status: Status) -> dict[str, Any]:
        """The checkpoint `train()` writes for this trial after its last epoch (model synced from the pack)."""
        cuda = list(self.rng_cuda)
        if cuda:
            cuda[self.cuda_index] = self.draws.get_state()
        return {
            "epoch": len(self.history),
            "status": status,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "torch": self.rng_cpu if cuda else self.draws.get_state(),
                "cuda": cuda,
                "generator": self.generator.get_state(),
            },
            "history": self.history,
            "config": self.config.model_dump(),
        }


class _Pack:
    """The members still training, fused: their `PackedNet` and `StackedOptimizer`, one epoch at a time."""

    def __init__(
        self, members: list[_Member], data: TensorData, channels_last: bool | None, batched: bool | None
    ) -> None:
        self.members = members
        self.data = data
        cfg = members[0].config.train
        self.cfg, self.device = cfg, members[0].device
        self.batched = batched
        self.net = PackedNet([m.model for m in members], self.device, [m.draws for m in members], batched)
        self.optimizer = StackedOptimizer([m.optimizer for m in members], [m.model for m in members], self.device)
        self.channels_last = use_channels_last(self.device, data.input_shape, channels_last)
        self.forward: Callable[[Tensor], Tensor] = torch.compile(self.net.forward) if cfg.compile else self.net.forward
        self.loss_fn = make_loss(cfg.loss, data.task)
        self.probe = next(data.batches("test", PROBE_SIZE, shuffle=False))

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(self.device.type, torch.bfloat16) if self.cfg.bf16 else contextlib.nullcontext()

    def _input(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _losses(self, out: Tensor, y: Tensor) -> Tensor:
        """Each member's loss, by the very call a trial alone makes."""
        return torch.stack([self.loss_fn(o, t) for o, t in zip(out, y, strict=True)])

    def _score(self, out: Tensor, y: Tensor) -> Tensor:
        if self.data.task != "classification":
            return torch.zeros(len(out), dtype=torch.long, device=out.device)
        return (out.argmax(-1) == y).sum(-1)

    def _leave(self, keep: list[int]) -> None:
        """Members not in `keep` leave the pack, their tensors and optimizer state synced into them first."""
        for i in range(len(self.members)):
            if i not in keep:
                self.sync(i)
        self.members = [self.members[i] for i in keep]
        if keep:
            self.net.select(keep)
            self.optimizer.select(keep)

    def sync(self, i: int) -> None:
        """Member i's net and optimizer state from the stack (for its checkpoint, or when it leaves)."""
        self.net.write_member(i, self.members[i].model)
        self.members[i].optimizer_state = self.optimizer.member_state_dict(i)

    def _fit(self) -> dict[_Member, tuple[dict[str, float], bool]]:
        """One pass over the training data for every member; a member whose loss is non-finite (or whose step would
        overflow) leaves the pack."""
        cfg, net = self.cfg, self.net
        net.training = True
        batches: list[Iterator[tuple[Tensor, Tensor]]] = [
            self.data.batches("train", cfg.batch_size, shuffle=True, generator=m.generator) for m in self.members
        ]
        k, dev = len(self.members), self.device
        loss_sum = torch.zeros(k, device=dev, dtype=torch.float64)
        correct = torch.zeros(k, device=dev, dtype=torch.long)
        count = 0
        results: dict[_Member, tuple[dict[str, float], bool]] = {}
        for _ in range(math.ceil(self.data.x_train.shape[0] / cfg.batch_size)):
            pairs = [next(b) for b in batches]
            x = self._input(net.stack_inputs([p[0] for p in pairs]))
            y = torch.stack([p[1] for p in pairs])
            with self._autocast():
                out = self.forward(x)
            out = out.float()
            losses = self._losses(out, y)
            count += len(y[0])
            overflow = torch.tensor(self.optimizer.overflows(), device=dev)  # as train(): such a step diverges
            finite = torch.isfinite(losses) & ~overflow
            for name in net.trainable:
                net.tensors[name].grad = None
            if bool(finite.all()):
                losses.sum().backward()
            else:  # as train(): the non-finite batch counts in the loss, not in the accuracy, and is not stepped
                keep = finite.nonzero().flatten().tolist()
                for i in (~finite).nonzero().flatten().tolist():
                    bad = loss_sum[i] + losses[i].detach() * len(y[0])
                    results[self.members[i]] = (self._train_metrics(bad, correct[i], count), True)
                if keep:
                    losses[keep].sum().backward()
                self._leave(keep)
                if not keep:
                    break
                index = torch.tensor(keep, device=dev)
                loss_sum, correct, losses = loss_sum[index], correct[index], losses[index]
                out, y = out[index], y[index]
                batches = [batches[i] for i in keep]
            net.optimizer_step(
                self.optimizer,
                batch_manhattan=[m.config.train.batch_manhattan for m in self.members],
                weight_clip=[m.config.train.weight_clip for m in self.members],
            )
            loss_sum += losses.detach() * len(y[0])
            correct += self._score(out.detach(), y)
        for i, m in enumerate(self.members):
            results[m] = (self._train_metrics(loss_sum[i], correct[i], count), False)
        return results

    def _train_metrics(self, loss_sum: Tensor, correct: Tensor, count: int) -> dict[str, float]:
        metrics = {"train_loss": float(loss_sum) / max(count, 1)}
        if self.data.task == "classification":
            metrics["train_acc"] = float(correct) / max(count, 1)
        return metrics

    @torch.no_grad()
    def _evaluate(
        self, net: PackedNet, forward: Callable[[Tensor], Tensor], split: Literal["val", "test"]
    ) -> list[dict[str, float]]:
        net.training = False
        k = net.members
        loss_sum, correct, count = [0.0] * k, [0] * k, 0
        for x, y in self.data.batches(split, 1024, shuffle=False):
            with self._autocast():
                out = forward(self._input(net.shared_input(x))).float()
            losses = self._losses(out, y.expand(k, *y.shape)).tolist()
            scores = self._score(out, y).tolist()
            for i in range(k):
                loss_sum[i] += losses[i] * len(y)
                correct[i] += scores[i]
            count += len(y)
        out_metrics = []
        for i in range(k):
            metrics = {f"{split}_loss": loss_sum[i] / max(count, 1)}
            if self.data.task == "classification":
                metrics[f"{split}_acc"] = correct[i] / max(count, 1)
            out_metrics.append(metrics)
        return out_metrics

    def epoch(self) -> list[tuple[_Member, dict[str, float]]]:
        """Every member's next epoch: train, evaluate, alignment where due; (member, metrics) in pack order."""
        start = time.perf_counter()
        starting = [(m, len(m.history) + 1, m.lr) for m in self.members]
        fit = self._fit()
        for m in self.members:
            m.step_schedule()
        diverged = [m for m, _, _ in starting if fit[m][1]]
        evaluated: dict[_Member, dict[str, float]] = {m: dict(fit[m][0]) for m, _, _ in starting}
        splits: list[Literal["val", "test"]] = (["val"] if self.data.x_val is not None else []) + ["test"]
        nets: list[tuple[list[_Member], PackedNet, Callable[[Tensor], Tensor]]] = []
        if self.members:
            nets.append((self.members, self.net, self.forward))
        if diverged:  # their last good weights, as alone
            lone = PackedNet([m.model for m in diverged], self.device, [m.draws for m in diverged], self.batched)
            nets.append((diverged, lone, lone.forward))
        for members, net, forward in nets:
            for split in splits:
                for m, metrics in zip(members, self._evaluate(net, forward, split), strict=True):
                    evaluated[m] |= metrics
        every = {m: m.config.train.alignment_every for m in self.members}
        number = {m: n for m, n, _ in starting}
        due = [i for i, m in enumerate(self.members) if every[m] and number[m] % every[m] == 0]
        if due:
            x, y = self.probe
            for i, metrics in zip(due, self.net.alignment(x, y, self.loss_fn, due), strict=True):
                evaluated[self.members[i]] |= metrics
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        out = []
        for m, n, lr in starting:
            metrics = {"epoch": float(n), **evaluated[m], "lr": lr, "diverged": float(m in diverged)}
            metrics["epoch_time_s"] = elapsed
            m.history.append(metrics)
            out.append((m, metrics))
        return out

    def retire_done(self) -> None:
        """Members whose epochs are all run leave the pack."""
        self._leave([i for i, m in enumerate(self.members) if not m.done])


def train_pack(
    configs: Sequence[TrialConfig],
    *,
    checkpoint_dirs: Sequence[str | Path | None] | None = None,
    checkpointing: CheckpointPolicy = CheckpointPolicy(),
    resume_from: Sequence[Path | None] | None = None,
    on_epoch: PackEpochCallback | None = None,
    channels_last: bool | None = None,
    batched: bool | None = None,
) -> list[TrialResult]:
    """Train `configs` (one pack, see `fasweep.packed.group`) as `train()` trains each; results in their order.

    `checkpoint_dirs[k]`/`resume_from[k]` are member k's `checkpoint_dir`/`resume_from` of `train()`, each member
    checkpointed by its own epochs and clock under `checkpointing`; `on_epoch(k, metrics, checkpoint or None)` after
    each epoch of member k. `channels_last` (image data) and
    `batched` (conv and untied layers as one call for all members, see `PackedNet`): None = on CUDA.
    """
    n = len(configs)
    if n == 0:
        raise UserError.field("pack", [], "at least one trial")
    reason = next((r for c in configs if (r := not_packable(c))), None)
    differ = next((d for c in configs[1:] if (d := pack_differences(configs[0], c))), None)
    if reason or differ:
        raise UserError.field("pack", n, f"trials that can share a pack, not ones that differ in {reason or differ}")
    dirs = list(checkpoint_dirs) if checkpoint_dirs is not None else [None] * n
    resumes = list(resume_from) if resume_from is not None else [None] * n
    if len(dirs) != n or len(resumes) != n:
        raise UserError.field("pack", (len(dirs), len(resumes)), f"one checkpoint dir and resume path per trial ({n})")
    states = [load_checkpoint(Path(r), c) if r is not None else None for c, r in zip(configs, resumes, strict=True)]
    results: dict[int, TrialResult] = {}
    for k, (state, path) in enumerate(zip(states, resumes, strict=True)):
        if state is not None and path is not None and state["status"] == "diverged":  # as train(): nothing to run
            history = list(state["history"])
            results[k] = TrialResult("diverged", history, history[-1])
    device = pick_device(configs[0].train.device)
    cfg0 = configs[0]
    data = load_data(cfg0.data, device=str(device), seed=cfg0.train.seed)
    members = [_Member(k, configs[k], data, device, states[k]) for k in range(n) if k not in results]
    savers = {m: Checkpointer(d, checkpointing, len(m.history)) for m in members if (d := dirs[m.index]) is not None}
    status: dict[_Member, Status] = dict.fromkeys(members, "finished")
    pack = None
    try:
        running = [m for m in members if not m.done]
        pack = _Pack(running, data, channels_last, batched) if running else None
        while pack is not None and pack.members:
            epoch = pack.epoch()
            for m, metrics in epoch:
                status[m] = "diverged" if metrics["diverged"] else "finished"
                saver = savers.get(m)
                saved = saver.save(len(m.history), m.done, partial(_state, pack, m, status[m])) if saver else None
                if on_epoch is not None:
                    on_epoch(m.index, dict(metrics), saved)
            pack.retire_done()
        for m in members:
            results[m.index] = TrialResult(status[m], m.history, dict(m.history[-1]) if m.history else {})
        return [results[k] for k in range(n)]
    finally:
        del pack
        if device.type == "cuda":  # several packs share one GPU: give its memory back now
            gc.collect()
            torch.cuda.empty_cache()


def _state(pack: _Pack, member: _Member, status: Status) -> dict[str, Any]:
    """A member's checkpoint (`_Member.state`), its net and optimizer state synced from the pack while in it."""
    if member in pack.members:
        pack.sync(pack.members.index(member))
    return member.state(status)
