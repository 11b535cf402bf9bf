"""fasweep.models: the layer-string grammar, the presets, and networks checked against stock torch nets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fasweep.config import FeedbackConfig, InitFrom, ModelConfig
from fasweep.errors import UserError
from fasweep.models import PRESETS, build_model, format_layers, parameter_count, parse_layers, resolve_arch
from fasweep.nn import FAConv2d, FALinear, UntiedConv2d


def _build(arch: str, shape=(3, 32, 32), outputs: int = 10, mode: str = "bp", **model) -> nn.Module:
    return build_model(ModelConfig(arch=arch, **model), FeedbackConfig(mode=mode), shape, outputs)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_round_trips(name: str) -> None:
    specs = parse_layers(PRESETS[name])
    assert format_layers(specs) == PRESETS[name]
    assert parse_layers(format_layers(specs)) == specs


def test_report_spellings_parse_to_canonical_form() -> None:
    text = "conv5x5/32 Pool3×3 UntieConv5*5/64(R^*) FixConv3x3/8(bp) Dense128(r) Dense10(R*)"
    canonical = "Conv5*5/32 Pool3*3 UntieConv5*5/64(R*) FixConv3*3/8(bp) Dense128(R) Dense10(R*)"
    assert format_layers(parse_layers(text)) == canonical
    specs = parse_layers("Dense20(sign_concordant) Dense10(dfa)")
    assert [s.feedback for s in specs] == ["sign_concordant", "dfa"]


@pytest.mark.parametrize(
    ("text", "where", "says"),
    [
        ("Dense512 Conv5*5 Dense10", "token 1: got 'Conv5*5'", "Conv<k>*<k>/<channels>"),
        ("Dense512 Dense256(Q) Dense10", "token 1: got 'Dense256(Q)'", "(R), (R*)"),
        ("Dense512 Dense Dense10", "token 1: got 'Dense'", "Dense<n>"),
        ("Conv5*3/32 Dense10", "token 0", "square kernel"),
        ("Dense0 Dense10", "token 0", ">= 1"),
        ("Conv5*5/32 Pool3*3(R) Dense10", "token 1", "no feedback mark"),
        ("Dense512 Dense10 Softmax", "token 2: got 'Softmax'", "train.loss"),
        ("Dense512 Blob3 Dense10", "token 1: got 'Blob3'", "Pool<k>*<k>"),
        ("Conv5*5/32 Pool3*3", "model.arch: got", "ending in a Dense layer"),
        ("   ", "model.arch: got", "a preset name"),
    ],
)
def test_malformed_layer_strings_name_token_and_form(text: str, where: str, says: str) -> None:
    with pytest.raises(UserError) as err:
        parse_layers(text)
    message = str(err.value)
    assert "\n" not in message
    assert where in message
    assert says in message


def test_unknown_preset_suggests_the_closest() -> None:
    with pytest.raises(UserError, match=r"model.arch: got 'dsr1-u'; expected did you mean DSR1-U\? a preset \(DS0,"):
        resolve_arch("dsr1-u")
    with pytest.raises(UserError, match=r"model.arch: got 'Lenet'; expected a preset \(DS0,"):
        resolve_arch("Lenet")
    assert resolve_arch("Dense10") == "Dense10"
    assert resolve_arch("PGR2-U") == PRESETS["PGR2-U"]


def test_conv_placement_errors_are_user_errors() -> None:
    with pytest.raises(UserError, match="token 1: got 'Conv3\\*3/8'"):
        _build("Dense16 Conv3*3/8 Dense10")
    with pytest.raises(UserError, match="token 0"):
        _build("Conv3*3/8 Dense10", shape=(30,))


@pytest.fixture(scope="module")
def pg0_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fasweep-style checkpoint of a PG0 net, to fill FixConv layers from."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("pg0") / "checkpoint.pt"
    torch.save({"epoch": 1, "model": _build("PG0").state_dict()}, path)
    return str(path)


# CIFAR-100 (100 outputs): one preset of each family; the output width is set in one place for all
_CIFAR100 = ["DSR2-U", "DDR4", "PGR2", "PG-Untie-R1-U", "PG-Fix-Untie-R3-U"]


@pytest.mark.parametrize(("name", "outputs"), [(name, 10) for name in PRESETS] + [(name, 100) for name in _CIFAR100])
def test_every_preset_trains_a_step_on_cifar_shapes(name: str, outputs: int, pg0_checkpoint: str) -> None:
    init = InitFrom(checkpoint=pg0_checkpoint, layers=[0]) if "Fix" in name else None
    torch.manual_seed(0)
    model = _build(name, outputs=outputs, mode="bp", init_from=init)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, outputs, (2,))
    out = model(x)
    assert out.shape == (2, outputs)
    nn.functional.cross_entropy(out, y).backward()
    for pname, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, pname
        if param.requires_grad:
            assert torch.isfinite(param.grad).all(), pname
    assert sum(p.numel() for p in model.parameters()) == parameter_count(name, num_outputs=outputs)
    for spec, (mname, module) in zip(
        [s for s in parse_layers(PRESETS[name]) if s.kind != "pool"],
        [(n, m) for n, m in model.named_children() if hasattr(m, "rule")],
        strict=True,
    ):
        assert module.rule.mode == (spec.feedback or "bp"), mname


def test_marks_override_the_default_rule_and_names_follow_token_index() -> None:
    model = _build("PGR2-U", mode="sign_concordant")
    names = [n for n, m in model.named_children() if hasattr(m, "rule")]
    assert names == ["conv0", "conv2", "conv4", "dense6", "dense7"]
    modes = [model.get_submodule(n).rule.mode for n in names]
    assert modes == ["sign_concordant"] * 3 + ["random_updated"] * 2
    untied = _build("PG-Untie")
    assert [type(untied.get_submodule(n)) for n in ("untie0", "untie2", "untie4")] == [UntiedConv2d] * 3
    assert untied.get_submodule("untie2").op.input_size == (16, 16)
    assert untied.get_submodule("dense6").in_features == 64 * 4 * 4


def _stock_pg0(pool: str) -> nn.Sequential:
    """Poggio's net from stock torch layers, written out by hand."""

    def pool_layer(first: bool) -> nn.Module:
        if pool == "max" or (pool == "poggio" and first):
            return nn.MaxPool2d(3, 2, 1)
        return nn.AvgPool2d(3, 2, 1, count_include_pad=False)

    return nn.Sequential(
        nn.Conv2d(3, 32, 5, padding=2),
        nn.Tanh(),
        pool_layer(True),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.Tanh(),
        pool_layer(False),
        nn.Conv2d(64, 64, 5, padding=2),
        nn.Tanh(),
        pool_layer(False),
        nn.Flatten(),
        nn.Linear(1024, 128),
        nn.Tanh(),
        nn.Linear(128, 10),
    )


@pytest.mark.parametrize("pool", ["poggio", "max", "avg"])
def test_pg0_with_bp_matches_a_stock_torch_net(pool: str) -> None:
    model = _build("PG0", activation="tanh", pool=pool)
    stock = _stock_pg0(pool)
    fa_layers = [m for m in model.children() if isinstance(m, FAConv2d | FALinear)]
    torch_layers = [m for m in stock if isinstance(m, nn.Conv2d | nn.Linear)]
    for fa, ref in zip(fa_layers, torch_layers, strict=True):
        ref.load_state_dict({"weight": fa.weight.detach(), "bias": fa.bias.detach()})
    x, y = torch.randn(5, 3, 32, 32), torch.randint(0, 10, (5,))
    out, ref_out = model(x), stock(x)
    torch.testing.assert_close(out, ref_out)
    nn.functional.cross_entropy(out, y).backward()
    nn.functional.cross_entropy(ref_out, y).backward()
    for fa, ref in zip(fa_layers, torch_layers, strict=True):
        torch.testing.assert_close(fa.weight.grad, ref.weight.grad)


def test_options_add_batchnorm_dropout_and_linear_activation() -> None:
    model = _build("Dense32 Dense16 Dense10", shape=(30,), batchnorm=True, dropout=0.2, activation="tanh")
    kinds = [type(m).__name__ for m in model.children()]
    assert kinds == [
        "FALinear",
        "BatchNorm1d",
        "Tanh",
        "Dropout",
        "FALinear",
        "BatchNorm1d",
        "Tanh",
        "Dropout",
        "FALinear",
    ]
    linear = _build("Dense20 Dense10", shape=(30,), activation="linear")
    assert [type(m).__name__ for m in linear.children()] == ["FALinear", "FALinear"]
    conv = _build("Conv3*3/8 Pool3*3 Dense10", shape=(1, 8, 8), batchnorm=True)
    assert isinstance(conv.get_submodule("bn0"), nn.BatchNorm2d)


def test_fixconv_takes_frozen_weights_from_init_from(pg0_checkpoint: str, tmp_path) -> None:
    source = torch.load(pg0_checkpoint, weights_only=True)["model"]
    model = _build("PG-Fix-Untie-R3-U", init_from=InitFrom(checkpoint=pg0_checkpoint))
    torch.testing.assert_close(model.fixconv0.weight, source["conv0.weight"], rtol=0, atol=0)
    assert not model.fixconv0.weight.requires_grad and not model.fixconv0.bias.requires_grad
    with pytest.raises(UserError, match=r"model.init_from: got None; expected a checkpoint .* FixConv layers \[0\]"):
        _build("PG-Fix-Untie")
    with pytest.raises(UserError, match=r"model.init_from.checkpoint: got 'nowhere.pt'"):
        _build("PG0", init_from=InitFrom(checkpoint="nowhere.pt"))
    with pytest.raises(UserError, match=r"model.init_from.layers: got 2; expected a layer of shape \(256, 800, 64\)"):
        _build("PG-Untie", init_from=InitFrom(checkpoint=pg0_checkpoint, layers=[2]))
    with pytest.raises(UserError, match=r"model.init_from.layers: got 5"):
        _build("PG0", init_from=InitFrom(checkpoint=pg0_checkpoint, layers=[5]))
    thawed = _build("PG0", init_from=InitFrom(checkpoint=pg0_checkpoint, layers=["conv2"], freeze=False))
    torch.testing.assert_close(thawed.conv2.weight, source["conv2.weight"], rtol=0, atol=0)
    assert thawed.conv2.weight.requires_grad


def test_dfa_preset_runs_after_finalize() -> None:
    model = _build("DS0", shape=(1, 8, 8), mode="dfa")
    out = model(torch.randn(3, 1, 8, 8))
    nn.functional.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    assert model.dense0.weight.grad is not None


def _forward_weights(arch: str, mode: str, seed: int) -> dict[str, torch.Tensor]:
    from fasweep.models import assemble

    torch.manual_seed(seed)  # as train() does before building
    model = assemble(
        parse_layers(resolve_arch(arch)), ModelConfig(pool="poggio"), FeedbackConfig(mode=mode), (3, 32, 32), 10
    )
    return {k: v for k, v in model.state_dict().items() if ".rule." not in k}


_FAMILIES = {
    "dense shallow": ["DS0", "DSR1", "DSR2", "DSR1-U", "DSR2-U"],
    "dense deep": ["DD0", "DDR1", "DDR2", "DDR4", "DDR1-U", "DDR2-U", "DDR4-U"],
    "poggio": ["PG0", "PGR1", "PGR2", "PGR1-U", "PGR2-U"],
    "untied": ["PG-Untie", "PG-Untie-R1", "PG-Untie-R2", "PG-Untie-R1-U", "PG-Untie-R2-U", "PGR3-Untie"],
    "fixed first layer": [
        "PG-Fix-Untie",
        "PG-Fix-Untie-R2",
        "PG-Fix-Untie-R3",
        "PG-Fix-Untie-R2-U",
        "PG-Fix-Untie-R3-U",
    ],
}


@pytest.mark.parametrize("family", list(_FAMILIES))
def test_one_seed_gives_every_rule_of_a_family_the_same_forward_weights(family: str) -> None:
    """Pairing by seed: W depends on (seed, shapes) only; B, masks and magnitudes come from streams of their own."""
    first, *others = _FAMILIES[family]
    base = _forward_weights(first, "bp", seed=7)
    variants = [(arch, "bp") for arch in others] + [(first, m) for m in ("random", "sign_concordant", "dfa")]
    for arch, mode in variants:
        got = _forward_weights(arch, mode, seed=7)
        assert got.keys() == base.keys()
        for name, w in base.items():
            assert torch.equal(got[name], w), f"{arch} ({mode}): {name} differs from {first} (bp) at one seed"
    other_seed = _forward_weights(first, "bp", seed=8)
    assert not any(torch.equal(other_seed[k], w) for k, w in base.items() if k.endswith("weight"))


def test_rule_streams_differ_by_layer_and_seed_but_not_by_rule() -> None:
    """R and R* share B at one seed (their only difference is the update); layers and seeds get their own B."""

    def feedback(arch: str, seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        model = _build(arch, (1, 8, 8))
        return {k.split(".")[0]: v for k, v in model.state_dict().items() if k.endswith(".rule.B")}

    r, u = feedback("Dense16(R) Dense16(R) Dense10(R)", 3), feedback("Dense16(R*) Dense16(R*) Dense10(R*)", 3)
    assert r.keys() == u.keys() == {"dense0", "dense1", "dense2"}
    assert all(torch.equal(r[k], u[k]) for k in r)
    assert not torch.equal(r["dense1"][:10, :10], r["dense2"][:10, :10])
    assert not torch.equal(feedback("Dense16(R) Dense16(R) Dense10(R)", 4)["dense1"], r["dense1"])
