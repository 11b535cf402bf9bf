"""fasweep.packed: a member of a pack is the same trial as alone (grads, metrics, checkpoints), real digits data.

On the CPU (the default path: bmm for dense layers, each member's own conv/untied op) a member is bitwise the
trial alone: every metric of every epoch, every checkpoint tensor. The batched path CUDA uses (one grouped
convolution, one batched matmul for all members) sums in another order; run here on the CPU it stays within
2.4e-7 in losses and 1.2e-5 degrees in angles of the trial alone over 3 epochs (asserted: 1e-5, 1e-3
degrees), accuracies equal. With batch norm, a bias before the norm has a zero gradient up to rounding;
Adam or batch manhattan turn that rounding into lr-sized steps, so there the batched path is only checked
under plain SGD, and eval-mode metrics still amplify it (measured 2.5e-4 in losses, 0.4 degrees, one sample
of accuracy; asserted 1e-3, 1 degree, 0.01).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fasweep.checkpoints import newest_checkpoint
from fasweep.config import CheckpointPolicy, TrialConfig, validate_trial
from fasweep.data import load_data
from fasweep.errors import UserError
from fasweep.models import build_model
from fasweep.packed import train_pack
from fasweep.packed.net import PackedNet
from fasweep.packed.optim import StackedOptimizer
from fasweep.packing import not_packable, pack_differences, packable
from fasweep.runs.layout import CHECKPOINT_FILE, HISTORY_FILE, epoch_marker
from fasweep.train import train
from fasweep.trial import Checkpoint

DENSE = "Dense32(sign_concordant) Dense16(sign_concordant) Dense10(R*)"
CONV = "Conv3*3/8 Pool3*3 Conv3*3/8(sign_concordant) Dense16(R*) Dense10(R)"
UNTIED = "UntieConv3*3/4 Pool3*3 UntieConv3*3/4(R*) Dense16(sign_concordant) Dense10(R)"
CONV_BN = "Conv3*3/8 Pool3*3 Dense16(R*) Dense10(sign_concordant)"
# what members of one pack may differ in, besides the seed (fasweep.packing.PER_MEMBER)
MEMBER_FIELDS: list[dict[str, Any]] = [
    {},
    {"feedback": {"magnitude": "batch_random"}, "train": {"lr": 2e-3}},
    {
        "feedback": {"decay": 0.01, "concordance": 0.5},
        "train": {"lr": 1e-4, "weight_clip": 0.3, "batch_manhattan": True, "alignment_every": 2},
    },
]


def _config(arch: str, seed: int = 0, **sections: dict[str, Any]) -> TrialConfig:
    base: dict[str, Any] = {
        "data": {"name": "digits"},
        "model": {"arch": arch},
        "feedback": {"mode": "random"},
        "train": {"epochs": 2, "seed": seed},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return validate_trial(base)


def _members(arch: str, **sections: dict[str, Any]) -> list[TrialConfig]:
    out = []
    for seed, fields in enumerate(MEMBER_FIELDS):
        merged = {k: {**sections.get(k, {}), **fields.get(k, {})} for k in sections.keys() | fields.keys()}
        out.append(_config(arch, seed, **merged))
    return out


def _untimed(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in history]


def _saved(folder: Path) -> Path:
    """The newest checkpoint file a trial (or member) wrote to `folder`."""
    path = newest_checkpoint(folder, folder)
    assert path is not None, f"no checkpoint in {folder}"
    return path


def _bitwise(a: Any, b: Any) -> bool:
    """Equal nested checkpoints/histories: tensors by torch.equal (and dtype), NaN equal to NaN."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_bitwise(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_bitwise(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return bool(a == b)


def _close(
    packed: list[dict[str, float]], alone: list[dict[str, float]], loss: float, degrees: float, acc: float = 0.0
) -> None:
    assert [h.keys() for h in packed] == [h.keys() for h in alone]
    for hp, ha in zip(_untimed(packed), _untimed(alone), strict=True):
        for key, value in ha.items():
            tol = degrees if "angle" in key else acc if key.endswith("_acc") else loss
            assert hp[key] == pytest.approx(value, abs=tol, rel=tol), key


# --- the fused model: first-step gradients --------------------------------------------------------------


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize(("arch", "batchnorm"), [(DENSE, False), (CONV, False), (UNTIED, False), (CONV_BN, True)])
def test_first_step_gradients_equal_the_trials_alone_in_float64(arch: str, batchnorm: bool, batched: bool) -> None:
    configs = _members(arch, model={"batchnorm": batchnorm})
    data = load_data(configs[0].data)
    models, states = [], []
    for c in configs:
        torch.manual_seed(c.train.seed)
        models.append(build_model(c.model, c.feedback, data.input_shape, data.num_outputs).double())
        states.append(torch.get_rng_state())
    generators = [torch.Generator().set_state(s) for s in states]
    net = PackedNet(models, torch.device("cpu"), generators, batched)
    batches = [
        (data.x_train[i * 64 : (i + 1) * 64].double() / 16, data.y_train[i * 64 : (i + 1) * 64]) for i in range(3)
    ]
    out = net(net.stack_inputs([x for x, _ in batches]))
    torch.stack([F.cross_entropy(o, y) for o, (_, y) in zip(out, batches, strict=True)]).sum().backward()
    for k, (model, (x, y)) in enumerate(zip(models, batches, strict=True)):
        torch.set_rng_state(states[k])  # batch_random magnitudes: the trial's own global RNG
        F.cross_entropy(model(x), y).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None
            assert (net.tensors[name].grad[k] - p.grad).abs().max() <= 1e-10, name
        for name, t in model.state_dict().items():  # batch norm running stats
            assert torch.allclose(net.tensors[name][k], t, rtol=0, atol=1e-10), name


# --- a member trains as the trial alone --------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "batchnorm"), [(DENSE, False), (CONV, False), (UNTIED, False), (CONV_BN, True)])
def test_members_are_bitwise_the_trials_alone_on_the_cpu(arch: str, batchnorm: bool) -> None:
    configs = _members(arch, model={"batchnorm": batchnorm}, train={"epochs": 3})
    packed = train_pack(configs)
    for config, member in zip(configs, packed, strict=True):
        alone = train(config)
        assert member.status == alone.status == "finished"
        assert _bitwise(_untimed(member.history), _untimed(alone.history))
    assert any(key.startswith("bw_angle/") for key in packed[0].final)
    assert len({r.final["test_loss"] for r in packed}) == 3


@pytest.mark.parametrize("arch", [CONV, UNTIED])
def test_batched_conv_and_untied_members_match_the_trials_alone(arch: str) -> None:
    configs = _members(arch, train={"epochs": 3})
    for config, member in zip(configs, train_pack(configs, batched=True), strict=True):
        _close(member.history, train(config).history, loss=1e-5, degrees=1e-3)


def test_batched_batchnorm_members_match_the_trials_alone_under_sgd() -> None:
    bn, sgd = {"batchnorm": True}, {"optimizer": "sgd", "lr": 0.01, "epochs": 3}
    configs = [
        _config(CONV_BN, 0, model=bn, train=sgd),
        _config(CONV_BN, 1, model=bn, feedback={"magnitude": "batch_random"}, train=sgd | {"lr": 0.005}),
        _config(CONV_BN, 2, model=bn, feedback={"decay": 0.01}, train=sgd | {"lr": 0.002, "weight_clip": 0.3}),
    ]
    for config, member in zip(configs, train_pack(configs, batched=True), strict=True):
        _close(member.history, train(config).history, loss=1e-3, degrees=1.0, acc=0.01)


@pytest.mark.parametrize("lr", [1e12, 1e307])  # a non-finite loss; an lr float32 cannot hold (the step overflows)
def test_a_diverging_member_leaves_the_pack_and_the_others_finish_unchanged(tmp_path: Path, lr: float) -> None:
    configs = [_config(DENSE, seed, train={"optimizer": "sgd", "momentum": 0.0, "epochs": 3}) for seed in range(3)]
    configs[1] = _config(DENSE, 1, train={"optimizer": "sgd", "momentum": 0.0, "epochs": 3, "lr": lr})
    dirs = [tmp_path / f"pack{k}" for k in range(3)]
    seen: list[tuple[int, float]] = []
    packed = train_pack(configs, checkpoint_dirs=dirs, on_epoch=lambda k, m, _: seen.append((k, m["epoch"])))
    assert [r.status for r in packed] == ["finished", "diverged", "finished"]
    assert [epoch for k, epoch in seen if k == 1] == [h["epoch"] for h in packed[1].history]
    assert len(packed[1].history) < 3 and len(packed[0].history) == 3
    for k, (config, member) in enumerate(zip(configs, packed, strict=True)):
        alone = train(config, checkpoint_dir=tmp_path / f"alone{k}")
        assert member.status == alone.status and _bitwise(_untimed(member.history), _untimed(alone.history))
        saved = torch.load(_saved(dirs[k]), weights_only=True)
        solo = torch.load(_saved(tmp_path / f"alone{k}"), weights_only=True)
        assert _bitwise(saved["model"], solo["model"]) and saved["status"] == member.status
    frozen = torch.load(_saved(dirs[1]), weights_only=True)["model"]
    assert all(torch.isfinite(t).all() for t in frozen.values())  # the last good weights
    again = train_pack(configs[:2], resume_from=[None, _saved(dirs[1])])
    assert again[1].status == "diverged" and _bitwise(again[1].history, packed[1].history)


# --- checkpoints: a member's slice is the trial's own checkpoint ----------------------------------------


def _interrupt_after(epoch: int, last: int) -> Any:
    class Interrupted(Exception):
        pass

    def on_epoch(k: int, metrics: dict[str, float], saved: str | None) -> None:
        assert saved is not None and {p.name for p in Path(saved).iterdir()} == {CHECKPOINT_FILE, HISTORY_FILE}
        if metrics["epoch"] == epoch and k == last:
            raise Interrupted

    return Interrupted, on_epoch


def test_a_member_checkpoint_is_the_trials_own_and_resumes_bitwise_in_either_trainer(tmp_path: Path) -> None:
    configs = _members(DENSE, train={"epochs": 3, "schedule": "cosine"}, data={"augment": True, "limit_train": 600})
    dirs = [tmp_path / f"pack{k}" for k in range(3)]
    interrupted, on_epoch = _interrupt_after(1, last=2)
    with pytest.raises(interrupted):
        train_pack(configs, checkpoint_dirs=dirs, on_epoch=on_epoch)
    for k, config in enumerate(configs):
        solo_dir = tmp_path / f"solo{k}"
        interrupted_solo, solo_on_epoch = _interrupt_after(1, last=0)
        with pytest.raises(interrupted_solo):
            train(config, checkpoint_dir=solo_dir, on_epoch=lambda m, c, f=solo_on_epoch: f(0, m, c))
        packed_state = torch.load(_saved(dirs[k]), weights_only=True)
        solo_state = torch.load(_saved(solo_dir), weights_only=True)
        packed_state["history"], solo_state["history"] = (_untimed(s["history"]) for s in (packed_state, solo_state))
        assert _bitwise(packed_state, solo_state)  # model, optimizer, schedule, every RNG, history, config
        whole = train(config)
        resumed = train(config, resume_from=_saved(dirs[k]))  # a pack's member, resumed alone
        assert _bitwise(_untimed(resumed.history), _untimed(whole.history))
    # a trial's own checkpoints resume as a pack, members at different epochs (own lr schedule positions)
    resume = [_saved(tmp_path / "solo0"), None, _saved(tmp_path / "solo2")]
    for config, member in zip(configs, train_pack(configs, resume_from=resume), strict=True):
        assert _bitwise(_untimed(member.history), _untimed(train(config).history))


def test_each_member_checkpoints_when_its_own_epochs_make_it_due(tmp_path: Path) -> None:
    configs = [_config(DENSE, seed, train={"epochs": 4}, data={"limit_train": 200}) for seed in range(2)]
    first = configs[1].model_copy(update={"train": configs[1].train.model_copy(update={"epochs": 1})})
    train(first, checkpoint_dir=tmp_path / "m1")  # member 1 joins after its epoch 1
    written: dict[int, list[float]] = {0: [], 1: []}

    def on_epoch(k: int, metrics: dict[str, float], saved: str | None) -> None:
        if saved is not None:
            written[k].append(metrics["epoch"])

    policy = CheckpointPolicy(every_epochs=2, keep=9)
    dirs = [tmp_path / "m0", tmp_path / "m1"]
    train_pack(
        configs, checkpoint_dirs=dirs, checkpointing=policy, resume_from=[None, _saved(dirs[1])], on_epoch=on_epoch
    )
    assert written == {0: [2.0, 4.0], 1: [3.0, 4.0]}  # 2 epochs after each one's last, and the last
    assert [sorted(p.name for p in d.iterdir()) for d in dirs] == [
        [epoch_marker(2), epoch_marker(4)],
        [epoch_marker(1), epoch_marker(3), epoch_marker(4)],
    ]


def test_a_batched_member_checkpoint_has_the_trials_format_and_resumes_alone(tmp_path: Path) -> None:
    arch = "Conv3*3/8 Pool3*3 UntieConv3*3/4(R*) Dense16(sign_concordant) Dense10(R)"
    sgd = {"optimizer": "sgd", "lr": 0.01}
    configs = [_config(arch, seed, model={"batchnorm": True}, train=sgd) for seed in range(3)]
    train_pack(configs, checkpoint_dirs=[tmp_path / f"m{k}" for k in range(3)], batched=True)
    train(configs[2], checkpoint_dir=tmp_path / "solo")
    packed_state = torch.load(_saved(tmp_path / "m2"), weights_only=True)
    solo_state = torch.load(_saved(tmp_path / "solo"), weights_only=True)

    def shapes(tree: Any) -> Any:
        if isinstance(tree, dict):
            return {k: shapes(v) for k, v in tree.items() if k != "history"}
        if isinstance(tree, list | tuple):
            return [shapes(v) for v in tree]
        return (tree.dtype, tuple(tree.shape)) if isinstance(tree, torch.Tensor) else type(tree)

    assert shapes(packed_state) == shapes(solo_state)
    assert packed_state.keys() == Checkpoint.__required_keys__  # the one schema, as declared
    more = configs[2].model_copy(update={"train": configs[2].train.model_copy(update={"epochs": 3})})
    resumed = train(more, resume_from=_saved(tmp_path / "m2"))
    _close(resumed.history, train(more).history, loss=1e-3, degrees=1.0, acc=0.01)


# --- the stacked optimizer is K torch optimizers ------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda ps, lr: torch.optim.Adam(
            [{"params": ps[:2], "weight_decay": 0.01}, {"params": ps[2:], "weight_decay": 0.0}], lr=lr
        ),
        lambda ps, lr: torch.optim.Adam(
            [{"params": ps[:2], "weight_decay": 0.01}, {"params": ps[2:], "weight_decay": 0.0}], lr=lr, fused=True
        ),
        lambda ps, lr: torch.optim.Adam(ps, lr=lr, fused=lr > 1e-3),  # one member fused, as a resumed pack may mix
        lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.0),
    ],
    ids=["adam", "adam-fused", "adam-fused-and-not", "nesterov", "sgd"],
)
def test_a_stacked_optimizer_is_k_torch_optimizers_bitwise(make: Any) -> None:
    torch.manual_seed(0)
    k, lrs = 4, [1e-3, 1e-3, 3e-2, 5e-4]
    models = [torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.Linear(33, 5)) for _ in range(k)]
    optimizers = [make(list(m.parameters()), lr) for m, lr in zip(models, lrs, strict=True)]
    for step in range(3):  # members 0 and 1 start with some steps of their own: resumed at different points
        for m, opt in zip(models[:2], optimizers[:2], strict=True):
            if step <= 1:
                for p in m.parameters():
                    p.grad = torch.randn_like(p)
                opt.step()
    tensors = {
        n: torch.stack([dict(m.named_parameters())[n].detach() for m in models])
        for n, _ in models[0].named_parameters()
    }
    resumed = [make(list(m.parameters()), lr) for m, lr in zip(models, lrs, strict=True)]
    for opt, again in zip(optimizers, resumed, strict=True):
        again.load_state_dict(opt.state_dict())
    stacked = StackedOptimizer(resumed, models, "cpu")
    for _ in range(5):
        for name, t in tensors.items():
            t.grad = torch.randn_like(t)
            for i, m in enumerate(models):
                dict(m.named_parameters())[name].grad = t.grad[i].clone()
        stacked.step(tensors)
        for opt in optimizers:
            opt.step()
        for name, t in tensors.items():
            assert all(torch.equal(t[i], dict(m.named_parameters())[name]) for i, m in enumerate(models)), name
    for i, opt in enumerate(optimizers):
        assert _bitwise(stacked.member_state_dict(i), opt.state_dict())


# --- which trials can share a pack --------------------------------------------------------------------


def test_packable_groups_trials_that_differ_only_per_member() -> None:
    same = [_config("DSR1", seed) for seed in range(3)]
    same += [
        _config("Dense512 Dense256 Dense10(R)", 3, train={"lr": 0.1, "weight_clip": 0.1, "batch_manhattan": True}),
        _config("DSR1", 4, feedback={"concordance": 0.0, "magnitude": "batch_random", "decay": 0.1, "init_scale": 2.0}),
        _config("DSR2", 5),  # feedback.mode random: every layer has the rule it has in DSR1
    ]
    other = [
        _config("DSR2", 0, feedback={"mode": "bp"}),
        _config("DSR1", 0, train={"batch_size": 64}),
        _config("DSR1", 0, train={"epochs": 3}),
        _config("DSR1", 0, train={"optimizer": "sgd"}),
        _config("DSR1", 0, model={"batchnorm": True}),
        _config("DSR1", 0, data={"limit_train": 100}),
        _config("DSR1", 0, feedback={"mode": "sign_concordant"}),  # the unmarked layers' rule differs
        _config("DSR1", 0, model={"dropout": 0.1}),
        _config("DSR1", 1, model={"dropout": 0.1}),
        _config("DSR1", 0, feedback={"mode": "dfa"}),
    ]
    groups = packable(same + other)
    assert groups[0] == [0, 1, 2, 3, 4, 5] and all(len(g) == 1 for g in groups[1:]) and len(groups) == 1 + len(other)
    assert packable(same, size=4) == [[0, 1, 2], [3, 4, 5]]
    assert "dropout" in str(not_packable(other[-2])) and "dfa" in str(not_packable(other[-1]))
    assert pack_differences(same[0], other[1]) == ["train.batch_size"]
    split = [_config("DSR1", seed, data={"val_fraction": 0.1}) for seed in (0, 0, 1)]
    assert packable(split) == [[0, 1], [2]]  # the validation split follows the seed
    with pytest.raises(UserError, match=r"pack: .* differ in \['train.batch_size'\]"):
        train_pack([same[0], other[1]])
    with pytest.raises(UserError, match="dropout"):
        train_pack([other[-3]])


# --- bf16, channels_last and torch.compile on the CPU ----------------------------------------------------


def _finite_and_near(result: Any, reference: Any, acc: float) -> None:
    assert result.status == "finished" and all(math.isfinite(v) for v in result.final.values())
    assert result.final["test_acc"] == pytest.approx(reference.final["test_acc"], abs=acc)
    assert result.final["train_loss"] == pytest.approx(reference.final["train_loss"], rel=0.05)


@pytest.mark.parametrize("batched", [False, True], ids=["per-member", "batched as on CUDA"])
def test_bf16_and_channels_last_run_on_the_cpu(batched: bool) -> None:
    arch = "Conv3*3/8 Pool3*3 UntieConv3*3/4(R*) Dense16(sign_concordant) Dense10(R)"
    configs = [_config(arch, seed, model={"batchnorm": True}) for seed in range(2)]
    fp32 = train_pack(configs)
    bf16 = [c.model_copy(update={"train": c.train.model_copy(update={"bf16": True})}) for c in configs]
    for result, reference in zip(train_pack(bf16, channels_last=True, batched=batched), fp32, strict=True):
        _finite_and_near(result, reference, acc=0.05)
        assert result.final["test_loss"] != reference.final["test_loss"]  # bf16 did run


@pytest.mark.slow
def test_compile_with_bf16_runs_on_the_cpu() -> None:
    small = {"limit_train": 256, "limit_test": 128}
    configs = [_config("Dense16(R*) Dense10(sign_concordant)", seed, data=small) for seed in range(2)]
    fp32 = train_pack(configs)
    update = {"compile": True, "bf16": True}
    compiled = [c.model_copy(update={"train": c.train.model_copy(update=update)}) for c in configs]
    for result, reference in zip(train_pack(compiled), fp32, strict=True):
        _finite_and_near(result, reference, acc=0.05)
