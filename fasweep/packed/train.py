"""`train_pack(configs)`: K compatible trials trained as one fused model in one process (no Ray inside).

Each member is the trial `fasweep.train.train` would run, through the same loop (`fasweep.train.run_trials`) and
state (`fasweep.trial.TrialState`): seeded from its own `train.seed` (weights, B and masks drawn exactly as
alone), its own data order and augmentation, optimizer state, lr schedule, history and status, and it writes the
checkpoint and `history.json` that `train()` writes for that trial, so either trainer resumes it. A member whose
loss turns non-finite stops before that step, leaves the pack with its last good weights (evaluated, as alone)
and ends `diverged`; the others go on. `PackedNets` is what the loop trains: the members' `PackedNet` and
`StackedOptimizer`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from fasweep.config import CheckpointPolicy, TrialConfig
from fasweep.errors import UserError
from fasweep.packed.net import PackedNet
from fasweep.packed.optim import StackedOptimizer
from fasweep.packing import not_packable, pack_differences
from fasweep.train import LossFn, TrialsCallback, run_trials
from fasweep.trial import TrialResult, TrialState


class PackedNets:
    """`fasweep.train.Nets` of a pack's members: their `PackedNet` and (`stepped`) `StackedOptimizer`.

    `batched`: conv and untied layers as one call for all members (see `PackedNet`); None = on CUDA.
    """

    def __init__(
        self,
        members: list[TrialState],
        channels_last: bool,
        *,
        batched: bool | None = None,
        stepped: bool = True,
    ) -> None:
        self.members = members
        self.channels_last, self.batched = channels_last, batched
        device = members[0].device
        self.net = PackedNet([m.model for m in members], device, [m.draws for m in members], batched)
        self.optimizer = None
        self._forward: Callable[[Tensor], Tensor] = self.net.forward
        if stepped:
            self.optimizer = StackedOptimizer([m.optimizer for m in members], [m.model for m in members], device)
            if members[0].config.train.compile:
                self._forward = torch.compile(self.net.forward)

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def inputs(self, xs: list[Tensor]) -> Tensor:
        return self._layout(self.net.stack_inputs(xs))

    def shared(self, x: Tensor) -> Tensor:
        return self._layout(self.net.shared_input(x))

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x)

    def mode(self, training: bool) -> None:
        self.net.training = training

    def zero_grad(self) -> None:
        for name in self.net.trainable:
            self.net.tensors[name].grad = None

    def step(self) -> None:
        assert self.optimizer is not None
        self.net.optimizer_step(
            self.optimizer,
            batch_manhattan=[m.config.train.batch_manhattan for m in self.members],
            weight_clip=[m.config.train.weight_clip for m in self.members],
        )

    def overflows(self) -> list[bool]:
        assert self.optimizer is not None
        return self.optimizer.overflows()

    def leave(self, keep: list[int]) -> None:
        for i in range(len(self.members)):
            if i not in keep:
                self.sync(i)
        self.members = [self.members[i] for i in keep]
        if keep:
            self.net.select(keep)
            if self.optimizer is not None:
                self.optimizer.select(keep)

    def sync(self, index: int) -> None:
        self.net.write_member(index, self.members[index].model)
        if self.optimizer is not None:
            self.members[index].optimizer_state = self.optimizer.member_state_dict(index)

    def alignment(self, x: Tensor, y: Tensor, loss_fn: LossFn, due: list[int]) -> list[dict[str, float]]:
        return self.net.alignment(x, y, loss_fn, due)

    def alone(self, members: list[TrialState]) -> PackedNets:
        return PackedNets(members, self.channels_last, batched=self.batched, stepped=False)


def train_pack(
    configs: Sequence[TrialConfig],
    *,
    checkpoint_dirs: Sequence[str | Path | None] | None = None,
    checkpointing: CheckpointPolicy = CheckpointPolicy(),
    resume_from: Sequence[Path | None] | None = None,
    on_epoch: TrialsCallback | None = None,
    channels_last: bool | None = None,
    batched: bool | None = None,
) -> list[TrialResult]:
    """Train `configs` (one pack, see `fasweep.packing`) as `train()` trains each; results in their order.

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
    return run_trials(
        configs,
        partial(PackedNets, batched=batched),
        checkpoint_dirs=dirs,
        checkpointing=checkpointing,
        resume_from=resumes,
        on_epoch=on_epoch,
        channels_last=channels_last,
    )
