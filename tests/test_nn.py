"""fasweep.nn: every rule's gradients against explicit matrix products computed independently (NumPy)."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fasweep.errors import UserError
from fasweep.nn import (
    FAConv2d,
    FALinear,
    UntiedConv2d,
    alignment,
    clip_weights,
    convert,
    exact_backprop,
    finalize,
    make_rule,
    optimizer_step,
)
from fasweep.nn import untied as untied_module

FA_MODES = [
    ("random", {}),
    ("random", {"init_scale": 0.3}),
    ("random_updated", {}),
    ("sign_concordant", {"concordance": 0.7, "magnitude": "uniform"}),
    ("sign_concordant", {"concordance": 0.5, "magnitude": "fixed_random"}),
    ("sign_concordant", {"concordance": 0.9, "magnitude": "batch_random"}),
]


def npy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def backward_with(layer: nn.Module, x: torch.Tensor, seed: int = 0) -> np.ndarray:
    """Run forward + backward with a random upstream gradient G; return G (NumPy)."""
    out = layer(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(g)
    return npy(g)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- bp equals stock autograd ---------------------------------------------------------------------


def test_bp_linear_equals_nn_linear():
    ref = nn.Linear(7, 5)
    fa = convert(copy.deepcopy(ref), "bp")
    assert isinstance(fa, FALinear)
    x1 = torch.randn(4, 3, 7, requires_grad=True)  # leading dims beyond the batch
    x2 = x1.detach().clone().requires_grad_()
    g = torch.randn(4, 3, 5)
    ref(x1).backward(g)
    fa(x2).backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fa.weight.grad, ref.weight.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fa.bias.grad, ref.bias.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"stride": 2, "padding": 1}, {"padding": "same", "groups": 2, "dilation": 2}])
def test_bp_conv_equals_nn_conv2d(kwargs):
    ref = nn.Conv2d(4, 6, 3, **kwargs)
    fa = convert(copy.deepcopy(ref), "bp")
    assert isinstance(fa, FAConv2d)
    x1 = torch.randn(2, 4, 9, 9, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    out = ref(x1)
    g = torch.randn_like(out)
    out.backward(g)
    fa(x2).backward(g)
    for got, want in [(x2.grad, x1.grad), (fa.weight.grad, ref.weight.grad), (fa.bias.grad, ref.bias.grad)]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64_bp_layers():
    d = torch.float64
    lin = FALinear(5, 3, feedback="bp", dtype=d)
    conv = FAConv2d(2, 2, 3, stride=2, padding=1, feedback="bp", dtype=d)
    untied = UntiedConv2d(2, 2, (2, 3), (4, 4), stride=1, padding=1, feedback="bp", dtype=d)
    for layer, shape in [(lin, (3, 5)), (conv, (2, 2, 4, 4)), (untied, (2, 2, 4, 4))]:
        x = torch.randn(shape, dtype=d, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x, w, b, m=layer: torch.func.functional_call(m, {"weight": w, "bias": b}, (x,)),
            (x, layer.weight, layer.bias),
        )


# ---- FA rules: input gradient through B, parameter gradients unchanged ----------------------------


@pytest.mark.parametrize(("mode", "opts"), FA_MODES)
def test_dense_grad_input_is_G_times_B(mode, opts):
    layer = FALinear(6, 4, feedback=mode, **opts)
    x = torch.randn(5, 6, requires_grad=True)
    G = backward_with(layer, x)
    B = npy(layer.feedback_weight)
    assert B.shape == (4, 6) and not np.allclose(B, npy(layer.weight))
    np.testing.assert_allclose(npy(x.grad), G @ B, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(npy(layer.weight.grad), G.T @ npy(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(npy(layer.bias.grad), G.sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("mode", "opts"), FA_MODES)
def test_conv_grad_input_is_conv_transpose_with_B(mode, opts):
    layer = FAConv2d(3, 5, 3, stride=2, padding=1, feedback=mode, **opts)
    ref = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    ref.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    G = backward_with(layer, x)
    ref(x_ref).backward(torch.from_numpy(G).float())
    B = layer.feedback_weight
    want = F.conv_transpose2d(torch.from_numpy(G).float(), B, stride=2, padding=1, output_padding=0)
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x.grad, x_ref.grad, atol=1e-3)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)


def _untied_explicit(x, W, b, B, G, k, stride, pad):
    """Locally connected layer by loops over output positions (NumPy): forward, dx through B, dW."""
    n, c, h, w = x.shape
    kh, kw = k
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    out = np.zeros((n, W.shape[2], oh, ow))
    dxp, dW = np.zeros_like(xp), np.zeros_like(W)
    for i in range(oh):
        for j in range(ow):
            p = i * ow + j
            rows, cols = slice(i * stride, i * stride + kh), slice(j * stride, j * stride + kw)
            patch = xp[:, :, rows, cols].reshape(n, -1)  # (N, C*kh*kw), channel-major like the layer
            out[:, :, i, j] = patch @ W[p] + b[:, i, j]
            dxp[:, :, rows, cols] += (G[:, :, i, j] @ B[p].T).reshape(n, c, kh, kw)
            dW[p] = patch.T @ G[:, :, i, j]
    return out, dxp[:, :, pad : pad + h, pad : pad + w], dW


@pytest.fixture(params=["one chunk", "one row per chunk"])
def untied_chunks(request, monkeypatch):
    """UntiedConv2d's patches at once (these sizes fit one chunk) or one output row at a time."""
    if request.param == "one row per chunk":
        monkeypatch.setattr(untied_module, "CHUNK_BYTES", 1)


@pytest.mark.parametrize(("mode", "opts"), [("bp", {}), *FA_MODES[:1], FA_MODES[3]])
@pytest.mark.parametrize(("stride", "pad"), [(1, 1), (2, 0)])
@pytest.mark.usefixtures("untied_chunks")
def test_untied_against_explicit_loop(mode, opts, stride, pad):
    layer = UntiedConv2d(2, 3, (3, 2), (6, 5), stride=stride, padding=pad, feedback=mode, **opts)
    x = torch.randn(2, 2, 6, 5, requires_grad=True)
    out = layer(x)
    G = backward_with(layer, x)
    B = npy(layer.feedback_weight)
    want_out, want_dx, want_dW = _untied_explicit(npy(x), npy(layer.weight), npy(layer.bias), B, G, (3, 2), stride, pad)
    np.testing.assert_allclose(npy(out), want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(npy(x.grad), want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(npy(layer.weight.grad), want_dW, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(npy(layer.bias.grad), G.sum(0), rtol=1e-5, atol=1e-5)
    assert layer.weight.shape == (math.prod(layer.output_size), 2 * 3 * 2, 3)


@pytest.mark.parametrize(("size", "stride", "pad"), [(32, 1, 0), (11, 2, 2)])
def test_from_conv2d_matches_conv(size, stride, pad):
    conv = nn.Conv2d(3, 32, 5, stride=stride, padding=pad)
    untied = UntiedConv2d.from_conv2d(conv, size)
    x = torch.randn(4, 3, size, size)
    torch.testing.assert_close(untied(x), conv(x), rtol=0, atol=1e-5)
    assert untied.weight.numel() == math.prod(untied.output_size) * 3 * 25 * 32
    assert untied.rule.mode == "bp"


def _dense_untied(weight, in_shape, kernel, stride, pad):
    """(C*H*W, O*P) dense mostly-zero matrix of an untied layer's weight (P, C*kh*kw, O), built by indexing."""
    c, h, w = in_shape
    positions, _, out_ch = weight.shape
    index = torch.arange(c * h * w, dtype=torch.float64).view(1, c, h, w)
    index = F.pad(index + 1, (pad, pad, pad, pad))  # 0 marks padding
    rows = F.unfold(index, kernel, stride=stride)[0].long()  # (C*kh*kw, P)
    dense = torch.zeros(c * h * w + 1, out_ch, positions, dtype=weight.dtype)
    dense[rows, :, torch.arange(positions)] = weight.permute(1, 0, 2)
    return dense[1:].reshape(c * h * w, out_ch * positions)


@pytest.mark.parametrize(("stride", "pad", "channels_last"), [(1, 2, False), (2, 1, True), (1, 0, True)])
@pytest.mark.usefixtures("untied_chunks")
def test_untied_float64_equals_tied_conv_and_dense_form(stride, pad, channels_last):
    """float64: from_conv2d equals the conv (forward, dx under bp, summed dW and db); under random B every
    output and gradient equals the dense (C*H*W, O*P) matrix form, computed independently by indexing."""
    conv = nn.Conv2d(3, 4, (3, 2), stride=stride, padding=pad).double()
    untied = UntiedConv2d.from_conv2d(conv, (7, 6))
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [conv(xs[0]), untied(xs[1])]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    g = torch.randn_like(outs[0])
    for out in outs:
        out.backward(g)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(untied.weight.grad.sum(0), conv.weight.grad.flatten(1).t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(untied.bias.grad.sum((1, 2)), conv.bias.grad, rtol=1e-12, atol=1e-12)

    fa = UntiedConv2d(3, 4, (3, 2), (7, 6), stride=stride, padding=pad, feedback="random", dtype=torch.float64)
    xf = x.clone().requires_grad_()
    out = fa(xf)
    out.backward(g)
    B = fa.feedback_weight
    assert B.shape == fa.weight.shape
    kw = {"in_shape": (3, 7, 6), "kernel": (3, 2), "stride": stride, "pad": pad}
    dense_w = _dense_untied(fa.weight.detach(), **kw).requires_grad_()
    bias = fa.bias.detach().flatten().clone().requires_grad_()
    want = x.flatten(1) @ dense_w + bias
    torch.testing.assert_close(out.flatten(1), want, rtol=1e-12, atol=1e-12)
    want.backward(g.flatten(1))
    gf = g.flatten(1)
    torch.testing.assert_close(xf.grad.flatten(1), gf @ _dense_untied(B, **kw).t(), rtol=1e-12, atol=1e-12)
    # dW: the dense gradient read back at the weight's own entries
    torch.testing.assert_close(fa.weight.grad, _gather_dense(dense_w.grad, **kw), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fa.bias.grad.flatten(), bias.grad, rtol=1e-12, atol=1e-12)


def _gather_dense(dense, in_shape, kernel, stride, pad):
    """Inverse of `_dense_untied` on its nonzero pattern: (C*H*W, O*P) -> (P, C*kh*kw, O)."""
    c, h, w = in_shape
    index = F.pad(torch.arange(c * h * w, dtype=torch.float64).view(1, c, h, w) + 1, (pad, pad, pad, pad))
    rows = F.unfold(index, kernel, stride=stride)[0].long()  # (C*kh*kw, P)
    positions = rows.shape[1]
    padded = torch.cat([torch.zeros(1, dense.shape[1], dtype=dense.dtype), dense])
    per_pos = padded.view(c * h * w + 1, -1, positions)  # (C*H*W+1, O, P)
    return per_pos[rows, :, torch.arange(positions)].permute(1, 0, 2)


def test_untied_dfa_input_grad_has_the_input_shape():
    net = finalize(nn.Sequential(UntiedConv2d(2, 3, 3, 5, padding=1, feedback="dfa"), nn.Flatten(), FALinear(75, 4)))
    x = torch.randn(3, 2, 5, 5, requires_grad=True)
    out = net(x)
    g = torch.randn_like(out)
    out.backward(g)
    B = net[0].feedback_weight
    assert B.shape == (4, 2 * 5 * 5)
    torch.testing.assert_close(x.grad, (g @ B).view_as(x))


def test_untied_no_grad_and_first_layer_paths_agree():
    layer = UntiedConv2d(2, 3, 3, (6, 5), stride=2, padding=1)
    x = torch.randn(2, 2, 6, 5)
    with torch.no_grad():
        ref = layer(x)
    out = layer(x)  # x needs no grad: only dW, db
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None


def test_untied_autocast_bf16_close_to_fp32():
    layer = UntiedConv2d(3, 8, 3, 8, padding=1, feedback="random")
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    ref = layer(x)
    ref.square().mean().backward()
    grads = (x.grad.clone(), layer.weight.grad.clone())
    x.grad = layer.weight.grad = layer.bias.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(layer(x), out, rtol=0, atol=0)  # the no-grad path: the same bf16 products
    out.float().square().mean().backward()
    assert x.grad.dtype == layer.weight.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    torch.testing.assert_close(x.grad, grads[0], rtol=0.1, atol=2e-3)
    torch.testing.assert_close(layer.weight.grad, grads[1], rtol=0.1, atol=2e-3)


# ---- sign-concordant details ----------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_sign_concordance_fraction(p):
    layer = FALinear(256, 256, feedback="sign_concordant", concordance=p, magnitude="fixed_random")
    layer(torch.randn(2, 256, requires_grad=True)).sum().backward()
    B, W = npy(layer.feedback_weight), npy(layer.weight)
    measured = float(np.mean(np.sign(B) == np.sign(W)))
    assert abs(measured - p) < 0.02


def test_sign_concordant_magnitudes():
    def two_draws(magnitude: str) -> tuple[torch.Tensor, torch.Tensor]:
        layer = FALinear(64, 32, feedback="sign_concordant", magnitude=magnitude)
        draws = []
        for _ in range(2):
            layer(torch.randn(3, 64, requires_grad=True)).sum().backward()
            draws.append(layer.feedback_weight.clone())
        w_rms = layer.weight.detach().pow(2).mean().sqrt()
        assert draws[0].pow(2).mean().sqrt() == pytest.approx(float(w_rms), rel=0.1)  # B on W's scale
        return draws[0], draws[1]

    a, b = two_draws("batch_random")
    assert not torch.equal(a.abs(), b.abs()) and torch.equal(a.sign(), b.sign())
    a, b = two_draws("fixed_random")
    assert torch.equal(a, b) and a.abs().std() > 0
    a, _ = two_draws("uniform")
    assert torch.allclose(a.abs(), a.abs()[0, 0].expand_as(a))


def test_sign_concordant_follows_current_weight():
    layer = FALinear(4, 3, feedback="sign_concordant", concordance=1.0)
    with torch.no_grad():
        layer.weight.neg_()
    layer(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert torch.equal(layer.feedback_weight.sign(), layer.weight.sign())


# ---- random_updated (R*) and Kolen-Pollack ---------------------------------------------------------


@pytest.mark.parametrize("opt", [torch.optim.SGD, torch.optim.Adam])
def test_random_updated_moves_by_w_step(opt):
    net = nn.Sequential(FALinear(6, 8, feedback="random_updated"), nn.Tanh(), FALinear(8, 3, feedback="random"))
    optimizer = opt(net.parameters(), lr=0.05)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(3):
        w0, b0 = net[0].weight.detach().clone(), net[0].rule.B.clone()
        fixed0 = net[2].rule.B.clone()
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer_step(net, optimizer)
        w_step = net[0].weight.detach() - w0
        assert w_step.abs().max() > 1e-4
        torch.testing.assert_close(net[0].rule.B - b0, w_step, rtol=0, atol=1e-7)
        assert torch.equal(net[2].rule.B, fixed0)  # plain random B never moves


def test_kolen_pollack_decay_makes_b_converge_to_w():
    layer = FALinear(10, 10, feedback="random_updated", decay=0.1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01)
    gap0 = float((layer.rule.B - layer.weight.detach()).norm())
    for _ in range(60):
        optimizer.zero_grad()
        layer(torch.randn(8, 10, requires_grad=True)).pow(2).mean().backward()
        optimizer_step(layer, optimizer)
    gap = float((layer.rule.B - layer.weight.detach()).norm())
    assert gap == pytest.approx(gap0 * 0.9**60, rel=1e-3)


def _r_star_net(decay: float = 0.0) -> nn.Sequential:
    last = FALinear(8, 3, feedback="random_updated", decay=decay)
    return nn.Sequential(FALinear(6, 8, feedback="bp"), nn.Tanh(), last)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda ps: torch.optim.Adam(ps, lr=0.05),
        lambda ps: torch.optim.AdamW(ps, lr=0.05, foreach=False),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_random_updated_follows_a_plain_optimizer_step(make_opt):
    net = copy.deepcopy(_r_star_net())  # a copy too: its layers are found again at their first forward
    layer = net[2]
    w0, b0 = layer.weight.detach().clone(), layer.rule.B.clone()
    optimizer = make_opt(net.parameters())
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    w, b = layer.weight.detach(), layer.rule.B
    assert (w - w0).abs().max() > 0.05  # W moved a lot ...
    torch.testing.assert_close(b - w, b0 - w0, rtol=0, atol=1e-6)  # ... and B by exactly as much


def test_copied_and_unpickled_r_star_layers_are_followed_before_any_forward():
    """A compiled forward does not register the weight, so a copy must be followed from the start."""
    for net in (copy.deepcopy(_r_star_net()), pickle.loads(pickle.dumps(_r_star_net()))):
        layer = net[2]
        b0 = layer.rule.B.clone()
        gap = b0 - layer.weight.detach()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
        for p in net.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        torch.testing.assert_close(layer.rule.B, b0 - 0.5, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.rule.B - layer.weight.detach(), gap, rtol=0, atol=1e-6)


@pytest.mark.parametrize("opt", [torch.optim.SGD, torch.optim.Adam])
def test_kolen_pollack_decay_against_a_hand_computed_update(opt):
    decay = 0.05
    layer = FALinear(6, 4, feedback="random_updated", decay=decay)
    twin = nn.Linear(6, 4)  # stock autograd gives the same dL/dW; the KP update is done by hand below
    twin.load_state_dict({"weight": layer.weight.detach(), "bias": layer.bias.detach()})
    opt_fa, opt_twin = opt(layer.parameters(), lr=0.02), opt(twin.parameters(), lr=0.02)
    b = layer.rule.B.clone()
    for i in range(8):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(i)).requires_grad_()
        for net, optimizer in ((layer, opt_fa), (twin, opt_twin)):
            optimizer.zero_grad()
            net(x).pow(2).mean().backward()
        w_before = twin.weight.detach().clone()
        opt_fa.step()
        opt_twin.step()
        with torch.no_grad():
            b = (1 - decay) * (b + twin.weight - w_before)
            twin.weight.mul_(1 - decay)
    torch.testing.assert_close(layer.weight.detach(), twin.weight.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.rule.B, b, rtol=0, atol=1e-6)


def test_optimizer_step_does_not_apply_r_star_twice():
    base = _r_star_net(decay=0.1)
    plain, helper = copy.deepcopy(base), copy.deepcopy(base)
    opt_plain = torch.optim.Adam(plain.parameters(), lr=0.01)
    opt_helper = torch.optim.Adam(helper.parameters(), lr=0.01)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(3):
        for net, optimizer in ((plain, opt_plain), (helper, opt_helper)):
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
        opt_plain.step()
        optimizer_step(helper, opt_helper)
    assert torch.equal(plain[2].rule.B, helper[2].rule.B) and torch.equal(plain[2].weight, helper[2].weight)


def test_clipped_step_moves_b_by_the_clipped_change():
    net = _r_star_net()
    layer = net[2]
    gap0 = layer.rule.B - layer.weight.detach()
    optimizer = torch.optim.SGD(net.parameters(), lr=5.0)
    F.cross_entropy(net(torch.randn(16, 6)), torch.randint(0, 3, (16,))).backward()
    optimizer_step(net, optimizer, weight_clip=0.05)
    assert layer.weight.abs().max() <= 0.05
    torch.testing.assert_close(layer.rule.B - layer.weight.detach(), gap0, rtol=0, atol=1e-6)


# ---- direct feedback alignment ---------------------------------------------------------------------


def test_dfa_two_hidden_layers_against_explicit():
    net = finalize(
        nn.Sequential(
            FALinear(5, 7, feedback="dfa"),
            nn.ReLU(),
            FALinear(7, 6, feedback="dfa"),
            nn.ReLU(),
            FALinear(6, 4, feedback="dfa"),
        )
    )
    x = torch.randn(9, 5, requires_grad=True)
    y = torch.randint(0, 4, (9,))
    F.cross_entropy(net(x), y).backward()
    B1, B2, B3 = (npy(net[i].feedback_weight) for i in (0, 2, 4))
    assert B1.shape == (4, 5) and B2.shape == (4, 7) and B3.shape == (4, 6)
    W1, W2, W3 = (npy(net[i].weight) for i in (0, 2, 4))
    b1, b2, b3 = (npy(net[i].bias) for i in (0, 2, 4))
    X = npy(x)
    a1 = X @ W1.T + b1
    h1 = np.maximum(a1, 0)
    a2 = h1 @ W2.T + b2
    h2 = np.maximum(a2, 0)
    logits = h2 @ W3.T + b3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    e = (p - np.eye(4)[y.numpy()]) / len(X)  # dL/dlogits of mean cross-entropy
    d2 = (e @ B3) * (a2 > 0)  # layer 3 sends e straight to h2 through its B
    d1 = (e @ B2) * (a1 > 0)  # layer 2 sends e straight to h1 (not d2 @ anything)
    tol = {"rtol": 1e-5, "atol": 1e-6}
    np.testing.assert_allclose(npy(net[4].weight.grad), e.T @ h2, **tol)
    np.testing.assert_allclose(npy(net[2].weight.grad), d2.T @ h1, **tol)
    np.testing.assert_allclose(npy(net[0].weight.grad), d1.T @ X, **tol)
    np.testing.assert_allclose(npy(x.grad), e @ B1, **tol)


def test_dfa_conv_and_state_dict_roundtrip():
    def build() -> nn.Module:
        return finalize(nn.Sequential(FAConv2d(2, 3, 3, feedback="dfa"), nn.Flatten(), FALinear(27, 4, feedback="dfa")))

    net = build()
    x = torch.randn(3, 2, 5, 5, requires_grad=True)
    out = net(x)
    g = torch.randn_like(out)
    out.backward(g)
    B1 = net[0].feedback_weight
    assert B1.shape == (4, 2 * 5 * 5)
    torch.testing.assert_close(x.grad, (g @ B1).view_as(x))
    fresh = build()
    fresh.load_state_dict(net.state_dict())
    x2 = x.detach().clone().requires_grad_()
    fresh(x2).backward(g)
    torch.testing.assert_close(x2.grad, x.grad)


def test_dfa_without_finalize_is_a_clear_error():
    net = nn.Sequential(FALinear(3, 4, feedback="dfa"), nn.ReLU(), FALinear(4, 2, feedback="dfa"))
    with pytest.raises(RuntimeError, match="finalize"):
        net(torch.randn(2, 3, requires_grad=True)).sum().backward()


# ---- optimizer step transforms, conversion ---------------------------------------------------------


def test_batch_manhattan_is_sign_step_and_clip():
    net = nn.Sequential(FALinear(4, 5, feedback="random"), nn.ReLU(), nn.Linear(5, 2))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    before = [p.detach().clone() for p in net.parameters()]
    F.cross_entropy(net(torch.randn(6, 4)), torch.randint(0, 2, (6,))).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    optimizer_step(net, optimizer, batch_manhattan=True)
    for p, p0, g in zip(net.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - 0.01 * g.sign())

    optimizer = torch.optim.SGD(net.parameters(), lr=10.0)
    optimizer.zero_grad()
    F.cross_entropy(net(torch.randn(6, 4)), torch.randint(0, 2, (6,))).backward()
    optimizer_step(net, optimizer, weight_clip=0.05)
    assert net[0].weight.abs().max() <= 0.05 and net[2].weight.abs().max() <= 0.05
    assert net[2].bias.abs().max() > 0.05  # biases are not clipped
    clip_weights(net, 0.01)
    assert net[0].weight.abs().max() <= 0.01


def test_convert_swaps_nested_layers_keeping_function():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 5, bias=False)),
        nn.BatchNorm1d(5),
    )
    model[0].weight.requires_grad_(False)
    x = torch.randn(2, 3, 6, 6)
    want = model(x)
    fa = convert(model, "sign_concordant", concordance=0.5)
    assert isinstance(fa[0], FAConv2d) and isinstance(fa[2][1], FALinear) and isinstance(fa[3], nn.BatchNorm1d)
    assert fa[2][1].rule.concordance == 0.5 and fa[2][1].bias is None
    assert not fa[0].weight.requires_grad
    assert fa[0].rule is not fa[2][1].rule
    torch.testing.assert_close(fa(x), want)
    kept = fa[2][1]
    assert convert(fa, "random")[2][1] is kept  # FA layers are left alone


def test_rule_object_and_state_dict():
    rule = make_rule("random", init_scale=0.5)
    a, b = FALinear(4, 4, feedback=rule), FALinear(4, 4, feedback=rule)
    assert a.rule is rule and b.rule is not rule and not torch.equal(a.rule.B, b.rule.B)
    assert float(a.rule.B.std()) == pytest.approx(0.5, rel=0.5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.rule.B, b.rule.B) and "rule.B" in a.state_dict()


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match=r"feedback.mode: got 'fa'; expected one of bp, random"):
        make_rule("fa")
    with pytest.raises(UserError, match=r"feedback\.concordance"):
        FALinear(2, 2, feedback="sign_concordant", concordance=1.5)
    with pytest.raises(UserError, match=r"feedback\.magnitude"):
        make_rule("sign_concordant", magnitude="gauss")


def test_autocast_bf16_keeps_fp32_grads():
    layer = FALinear(8, 4, feedback="random")
    x = torch.randn(3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == layer.weight.grad.dtype == torch.float32
    want = torch.ones(3, 4) @ layer.feedback_weight.bfloat16().float()
    torch.testing.assert_close(x.grad, want, rtol=2e-2, atol=2e-2)


# ---- alignment --------------------------------------------------------------------------------------


def _mlp(mode: str) -> nn.Module:
    return finalize(
        nn.Sequential(
            FALinear(6, 8, feedback=mode),
            nn.ReLU(),
            FALinear(8, 8, feedback=mode),
            nn.ReLU(),
            FALinear(8, 3, feedback=mode),
        )
    )


def test_alignment_bp_zero_random_positive_and_no_side_effects():
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    bp = alignment(_mlp("bp"), x, y, F.cross_entropy)
    assert set(bp) == {f"{k}/{i}" for k in ("angle", "delta_angle", "bw_angle", "bw_norm_ratio") for i in (0, 2, 4)}
    assert all(v < 1e-2 for k, v in bp.items() if "angle" in k)
    net = _mlp("random").train()
    rng = torch.get_rng_state()
    fa = alignment(net, x, y, F.cross_entropy)
    assert torch.equal(torch.get_rng_state(), rng) and net.training
    assert all(p.grad is None for p in net.parameters())
    assert fa["angle/0"] > 10 and fa["delta_angle/2"] > 10 and fa["bw_angle/2"] > 45
    assert fa["angle/4"] < 1e-2  # the output layer's update is always exact
    bn_net = nn.Sequential(FALinear(6, 8, feedback="random"), nn.BatchNorm1d(8), nn.Dropout(0.5), FALinear(8, 3))
    twice = [alignment(bn_net, x, y, F.cross_entropy) for _ in range(2)]
    assert twice[0] == twice[1] and float(bn_net[1].running_mean.abs().sum()) == 0.0  # eval mode: no BN update
    dfa = alignment(_mlp("dfa"), x, y, F.cross_entropy)
    assert "bw_angle/0" not in dfa and dfa["angle/0"] > 10


def test_alignment_angle_by_hand():
    net = nn.Sequential(FALinear(4, 5, feedback="random"), nn.Tanh(), FALinear(5, 2, feedback="random"))
    x, y = torch.randn(7, 4), torch.randn(7, 2)
    metrics = alignment(net, x, y, F.mse_loss)
    X, W1, b1, W2, b2 = npy(x), *(npy(t) for t in (net[0].weight, net[0].bias, net[2].weight, net[2].bias))
    h = np.tanh(X @ W1.T + b1)
    e = 2 * (h @ W2.T + b2 - npy(y)) / y.numel()
    B2 = npy(net[2].rule.B)
    d_fa, d_bp = e @ B2 * (1 - h**2), e @ W2 * (1 - h**2)
    g_fa, g_bp = (d_fa.T @ X).ravel(), (d_bp.T @ X).ravel()
    want = np.degrees(np.arccos(g_fa @ g_bp / np.linalg.norm(g_fa) / np.linalg.norm(g_bp)))
    assert metrics["angle/0"] == pytest.approx(want, abs=1e-3)
    delta = np.degrees(np.arccos(np.sum(d_fa * d_bp) / np.linalg.norm(d_fa) / np.linalg.norm(d_bp)))
    assert metrics["delta_angle/0"] == pytest.approx(delta, abs=1e-3)
    assert metrics["bw_norm_ratio/2"] == pytest.approx(np.linalg.norm(B2) / np.linalg.norm(W2), rel=1e-5)


def test_exact_backprop_restores_rules():
    net = _mlp("random")
    x = torch.randn(3, 6, requires_grad=True)
    with exact_backprop(net):
        net(x).sum().backward()
    ref = copy.deepcopy(net)
    for m in ref:
        if isinstance(m, FALinear):
            m.rule = make_rule("bp")
    x2 = x.detach().clone().requires_grad_()
    ref(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert not any(m.rule.exact for m in net if isinstance(m, FALinear))


def test_alignment_batch_random_draws_only_from_its_forked_rng():
    rule = make_rule("sign_concordant", concordance=0.8, magnitude="batch_random")
    net = nn.Sequential(FALinear(6, 8, feedback=rule), nn.ReLU(), FALinear(8, 8, feedback=rule), nn.ReLU())
    net.append(FALinear(8, 3, feedback=rule))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    rng = torch.get_rng_state()
    metrics = alignment(net, x, y, F.cross_entropy)
    assert torch.equal(torch.get_rng_state(), rng)  # the probe leaves the trial's RNG where it was
    # the first layer's B (no forward of its own drew one) comes from the forked RNG, after the forward's draws
    torch.set_rng_state(rng)
    for m in (net[2], net[4]):
        torch.randn_like(m.weight)
    first = net[0]
    b = np.sign(npy(first.weight)) * npy(first.rule.signed_magnitude) * np.abs(npy(torch.randn_like(first.weight)))
    b *= first.rule.sigma
    w = npy(first.weight).ravel()
    want = np.degrees(np.arccos(b.ravel() @ w / np.linalg.norm(b) / np.linalg.norm(w)))
    assert metrics["bw_angle/0"] == pytest.approx(want, abs=1e-3)
