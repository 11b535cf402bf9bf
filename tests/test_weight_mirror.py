"""weight_mirror (Akrout et al. 2019): the mirror step against its definition computed here, the B-W angle falling
in training, a pack bitwise as alone, and its registration by the entry point a user's package would use."""

from __future__ import annotations

import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fasweep.config import TrialConfig, validate_trial
from fasweep.errors import UserError
from fasweep.nn import FAConv2d, FALinear, optimizer_step
from fasweep.nn.weight_mirror import WeightMirror
from fasweep.packed import train_pack
from fasweep.rule_options import rule_info
from fasweep.train import train

REPO = Path(__file__).resolve().parents[1]
MIRROR = "fasweep.nn.weight_mirror:WeightMirror"  # its import path: the tests below need no installed entry point


def test_it_is_registered_by_an_entry_point_as_a_users_package_would() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["fasweep.rules"]
    assert declared == {"weight_mirror": "fasweep.nn.weight_mirror:WeightMirror"}
    installed = {ep.name: ep.value for ep in entry_points(group="fasweep.rules")}
    assert installed.get("weight_mirror") == declared["weight_mirror"], "run `make setup` to install entry points"
    info = rule_info("weight_mirror")
    assert info is WeightMirror.info and info.options == ("init_scale", "mirror_lr", "mirror_decay", "mirror_batch")


def _step(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step through `layer` (its input needs grad, so its rule sees a backward); B before, and the global RNG
    state the mirror step draws its noise from."""
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    b0 = layer.rule.B.clone()
    layer(x).square().sum().backward()
    rng = torch.get_rng_state()
    optimizer_step(layer, opt)
    return b0, rng


def test_a_dense_mirror_step_is_its_definition() -> None:
    torch.manual_seed(0)
    layer = FALinear(6, 4, feedback=MIRROR, mirror_lr=0.3, mirror_decay=0.2, mirror_batch=5)
    b0, rng = _step(layer, torch.randn(3, 6, requires_grad=True))
    noise = torch.randn(5, 6, generator=torch.Generator().set_state(rng))
    w = layer.weight.detach()
    y = noise @ w.t()
    assert torch.allclose(layer.rule.B, 0.8 * b0 + 0.3 * (y.t() @ noise) / 5, atol=1e-6)


def test_a_conv_mirror_step_is_its_definition_with_padding() -> None:
    """The correlation of y and xi by im2col here, divided by how many real (unpadded) inputs each weight saw."""
    torch.manual_seed(1)
    layer = FAConv2d(2, 3, 3, padding=1, feedback=MIRROR, mirror_lr=0.5, mirror_decay=0.1, mirror_batch=4)
    b0, rng = _step(layer, torch.randn(2, 2, 5, 5, requires_grad=True))
    noise = torch.randn(4, 2, 5, 5, generator=torch.Generator().set_state(rng))
    w = layer.weight.detach()
    cols = F.unfold(noise, 3, padding=1)  # (N, C*9, P)
    y = torch.einsum("of,nfp->nop", w.reshape(3, -1), cols)
    mirrored = torch.einsum("nop,nfp->of", y, cols)
    count = F.unfold(torch.ones(4, 2, 5, 5), 3, padding=1).sum((0, 2))  # real inputs per kernel entry, N of them
    expected = 0.9 * b0 + 0.5 * (mirrored / count).view_as(w)
    assert torch.allclose(layer.rule.B, expected, atol=1e-5)
    assert count.min() == 4 * 16 and count.max() == 4 * 25  # corners see 4x4 positions, the centre all 25


def _config(mode: str, seed: int = 0, **feedback: float) -> TrialConfig:
    return validate_trial(
        {
            "data": {"name": "digits"},
            "model": {"arch": "Conv3*3/8 Pool3*3 Conv3*3/8 Dense32 Dense10"},
            "feedback": {"mode": mode, **feedback},
            "train": {"epochs": 3, "seed": seed},
        }
    )


def test_the_b_w_angle_falls_during_training_and_a_pack_trains_it_as_alone() -> None:
    configs = [_config(MIRROR, 0), _config(MIRROR, 1, mirror_lr=0.1, mirror_decay=0.1)]
    alone = train(configs[0])
    angles = [[h[f"bw_angle/{layer}"] for h in alone.history] for layer in ("conv2", "dense3", "dense4")]
    for per_epoch in angles:  # from a random B's ~90 degrees
        assert per_epoch[0] < 60 and per_epoch[-1] < per_epoch[0] and per_epoch[-1] < 30, angles
    random = train(_config("random"))
    assert all(random.final[f"bw_angle/{layer}"] > 80 for layer in ("conv2", "dense3", "dense4"))
    packed = train_pack(configs)
    for config, member in zip(configs, packed, strict=True):
        solo = alone if config is configs[0] else train(config)
        keys = [k for k in solo.history[0] if k != "epoch_time_s"]
        assert [[h[k] for k in keys] for h in member.history] == [[h[k] for k in keys] for h in solo.history]


def test_its_options_are_checked_by_validate() -> None:
    with pytest.raises(UserError, match=r"^feedback\.mirror_batch: got 0; expected an integer from 1 to 4096$"):
        validate_trial({"feedback": {"mode": MIRROR, "mirror_batch": 0}})
