"""A rule is one class: registered here, in a test file, it is validated, planned and trained like a seed rule.

`Drifting` has every part a rule may have (an option of its own, its own dL/dx, a hook after each optimizer step
that draws random numbers) and none of it is known to fasweep by name: its trials train in a pack bitwise as
alone. `Loner` declares `packable = False`: the plan runs its trials alone and says why.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from fasweep.cli import main
from fasweep.config import TrialConfig, validate_trial
from fasweep.errors import UserError
from fasweep.models import layer_rules
from fasweep.nn import FALinear, optimizer_step
from fasweep.nn.rules import LayerOp, RandomFeedback
from fasweep.packed import train_pack
from fasweep.packing import not_packable
from fasweep.rule_options import OPTIONS, Option, rule_info
from fasweep.spec.plan import parse_spec
from fasweep.train import train

MODULE = __name__  # `test_rules`: pytest puts tests/ on sys.path, so `test_rules:Drifting` imports this module


class Drifting(RandomFeedback):
    """Random B (drawn as `random`'s), pulled a fraction `pull` of the way to W after every step, plus N(0, 1e-3)
    noise drawn from the trial's RNG; the feedback matrix is B + pull W, and dL/dx is half of G sent through it.
    It redefines `matrix`: `random`'s batched pack maths (its B as is) must not stand in for it."""

    mode = "drifting"
    options = {  # noqa: RUF012 (a declaration read once by FeedbackRule)
        "init_scale": OPTIONS["init_scale"],
        "pull": Option(0.1, lambda v: 0.0 <= v <= 1.0, "a fraction in [0, 1]", "how far B moves to W per step"),
    }
    pull: float

    def matrix(self, weight: Tensor) -> Tensor:
        return self.B + self.pull * weight

    def input_grad(self, op: LayerOp, grad_out: Tensor, weight: Tensor, feedback: Tensor, x: Tensor) -> Tensor:
        full = super().input_grad(op, grad_out, weight, feedback, x)
        return full if self.exact else full.mul_(0.5)

    def after_step(self, weight: Tensor) -> None:
        noise = torch.randn(self.B.shape, generator=self.rng, dtype=self.B.dtype, device=self.B.device)
        self.B.add_(weight - self.B, alpha=self.pull).add_(noise, alpha=1e-3)


class Loner(Drifting):
    """`Drifting`, declared unable to share a pack."""

    mode = "loner"
    packable = False


DRIFTING, LONER = f"{MODULE}:Drifting", f"{MODULE}:Loner"


def _config(arch: str, seed: int, **sections: dict[str, Any]) -> TrialConfig:
    base: dict[str, Any] = {
        "data": {"name": "digits", "limit_train": 512},
        "model": {"arch": arch},
        "feedback": {"mode": DRIFTING},
        "train": {"epochs": 2, "seed": seed, "batch_size": 64},
    }
    for key, value in sections.items():
        base[key] = {**base[key], **value}
    return validate_trial(base)


def test_a_rule_declared_on_its_class_is_found_by_its_import_path() -> None:
    info = rule_info(DRIFTING)
    assert (info.name, info.options, info.packable) == ("drifting", ("init_scale", "pull"), True)
    assert rule_info(LONER).packable == "the loner rule declares packable = False"
    layer = FALinear(4, 3, feedback=DRIFTING, pull=0.25)
    assert isinstance(layer.rule, Drifting) and layer.rule.pull == 0.25 and layer.rule.steps


def test_its_own_maths_and_hook_run_alone_as_declared() -> None:
    """One step of a Drifting layer against the rule's definition computed here: dL/dx = 0.5 G (B + pull W), and
    B <- B + pull (W' - B) + 1e-3 noise, the noise the global RNG's next draw after the step."""
    torch.manual_seed(0)
    layer = FALinear(5, 3, feedback=DRIFTING, pull=0.3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(4, 5, requires_grad=True)
    b0 = layer.rule.B.clone()
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.allclose(x.grad, 0.5 * g @ (b0 + 0.3 * layer.weight.detach()))
    rng = torch.get_rng_state()
    optimizer_step(layer, opt)
    noise = torch.randn(b0.shape, generator=torch.Generator().manual_seed(0).set_state(rng))
    assert torch.allclose(layer.rule.B, b0 + 0.3 * (layer.weight.detach() - b0) + 1e-3 * noise)


@pytest.mark.parametrize(
    "arch",
    [
        "Dense32(random_updated) Dense16 Dense10(sign_concordant)",
        "Conv3*3/4 Pool3*3 Conv3*3/4 Dense16(R) Dense10",
        "UntieConv3*3/4 Pool3*3 UntieConv3*3/4 Dense10",
    ],
)
def test_its_trials_train_in_a_pack_bitwise_as_alone(arch: str) -> None:
    configs = [
        _config(arch, 0),
        _config(arch, 1, feedback={"pull": 0.5, "magnitude": "batch_random"}, train={"lr": 3e-3}),
        _config(arch, 2, feedback={"pull": 0.0, "init_scale": 0.2}, train={"weight_clip": 0.2}),
    ]
    packed = train_pack(configs)
    for config, member in zip(configs, packed, strict=True):
        alone = train(config)
        keys = [k for k in alone.history[0] if k != "epoch_time_s"]
        assert [[h[k] for k in keys] for h in member.history] == [[h[k] for k in keys] for h in alone.history]
    assert any(k.startswith("bw_angle/") for k in packed[0].final)
    # B moved: with pull 0.5 the angle between B and W fell below a random B's 90 degrees
    angles = [v for k, v in packed[1].final.items() if k.startswith("bw_angle/") and math.isfinite(v)]
    assert angles and min(angles) < 80


def test_a_rule_that_cannot_pack_runs_alone_by_plan_and_the_plan_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = f"""\
name: lone
base:
  data: {{name: digits}}
  model: {{arch: Dense16 Dense10}}
grid:
  feedback.mode: [random, "{LONER}"]
seeds: [0, 1, 2]
pack: 4
"""
    plan = parse_spec(spec)
    packs = plan.packs("main")
    modes = [[t.config["feedback"]["mode"] for t in pack] for pack in packs]
    assert modes == [["random"] * 3, [LONER], [LONER], [LONER]]
    why = f"stage main: 3 of 6 trials run alone, not in packs of 4: feedback {LONER}: {rule_info(LONER).packable}"
    assert plan.warnings() == [why]
    path = tmp_path / "lone.yaml"
    path.write_text(spec)
    main(["plan", str(path)])
    assert why in capsys.readouterr().out
    lone = TrialConfig.model_validate(packs[1][0].config)
    with pytest.raises(UserError, match=r"^pack: .*declares packable = False"):
        train_pack([lone, lone])
    assert not_packable(lone) is not None


def test_its_options_are_validated_like_the_shared_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    feedback = validate_trial({"feedback": {"mode": DRIFTING, "pull": 0.5}}).feedback.model_dump()
    assert dict(layer_rules("Dense10", feedback)[0].options) == {"init_scale": None, "pull": 0.5}
    with pytest.raises(UserError, match=r"^feedback\.pull: got 2; expected a fraction in \[0, 1\]$"):
        validate_trial({"feedback": {"mode": DRIFTING, "pull": 2}})
    with pytest.raises(UserError, match=r"^feedback\.pul: unknown field \(did you mean pull\?\); expected one of mode"):
        validate_trial({"feedback": {"mode": DRIFTING, "pul": 0.5}})
    with pytest.raises(UserError, match=r"^feedback\.pull: unknown field; expected one of mode, init_scale"):
        validate_trial({"feedback": {"mode": "random", "pull": 0.5}})
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: s\nbase:\n  feedback: {{mode: '{DRIFTING}'}}\ngrid:\n  feedback.pull: [0.1, 1.5]\n")
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(spec)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.splitlines() == [
        f"error: {spec}:5: grid.feedback.pull[1]: got 1.5; expected a fraction in [0, 1]"
    ]
