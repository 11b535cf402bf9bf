"""Benchmark fasweep.nn: FA vs BP training-step time, and UntiedConv2d vs the seed's dense-matrix form.

Prints ratios measured in this one run (interleaved repetitions, medians):
- FA step / BP step for Linear and Conv2d (fwd + bwd + optimizer step; BP = stock nn.Linear/nn.Conv2d).
- The seed's first untied layer (3x32x32 input, 5x5, 32 channels, no padding): bytes of weights and
  fwd+bwd time for UntiedConv2d vs the dense mostly-zero (3072, 32*28*28) matrix vs nn.Conv2d.
- Preset nets PG-Untie vs PG0 (poggio pools, batch 128, fwd + bwd + the trainer's Adam): ms per step, GFLOP/s,
  the ratio, and the limit: PG0's step scaled to PG-Untie's FLOPs (the tied net's rate) plus the time to move
  the bytes the untied net's parameters add (W read forward, B read for dL/dx, dW written, Adam's one pass
  over param, grad and its two moments) at this machine's memory bandwidth, measured here by a large copy;
  and the nets' matrix products alone (PG0's convolutions, PG-Untie's bmms), whose rates set how near the
  limit the untied net can get with torch's kernels.

Usage: python benchmarks/bench_nn.py [--device cpu|cuda] [--reps N] [--threads T] [--only presets]
(THP_MEM_ALLOC_ENABLE=0 in the environment measures without the huge pages fasweep asks for, FASWEEP_MKL_AVX512=0
without MKL's AVX-512 path on an AMD CPU; see fasweep/torch_env.py.)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from fasweep.torch_env import apply_torch_env, mkl_avx512_library, with_mkl_avx512

with_mkl_avx512()  # as fasweep's CLI and its local workers run torch (FASWEEP_MKL_AVX512=0 measures without)
TORCH_ENV = apply_torch_env()  # likewise (set a variable to 0 to measure without)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from fasweep.nn import FAConv2d, FALinear, UntiedConv2d, optimizer_step  # noqa: E402


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return run


def compare(cases: dict[str, Callable[[], object]], reps: int, device: torch.device) -> dict[str, float]:
    """Median seconds per case; cases are interleaved so drifts in machine load hit all of them alike."""
    return {name: statistics.median(t) for name, t in _interleaved(cases, reps, device).items()}


def paired_ratios(
    cases: dict[str, Callable[[], object]], base: str, reps: int, device: torch.device
) -> dict[str, float]:
    """Median over repetitions of time(case) / time(base) within the same repetition (robust on a busy host)."""
    times = _interleaved(cases, reps, device)
    return {name: statistics.median(a / b for a, b in zip(t, times[base], strict=True)) for name, t in times.items()}


def _interleaved(cases: dict[str, Callable[[], object]], reps: int, device: torch.device) -> dict[str, list[float]]:
    run = timer(device)
    for fn in cases.values():  # warm-up
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            times[name].append(run(fn))
    return times


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        x.grad = None
        F.cross_entropy(model(x).flatten(1), y).backward()
        optimizer_step(model, opt)

    return step


def bench_rules(device: torch.device, reps: int) -> None:
    """FA / BP step-time ratios for a dense and a conv layer, per rule."""
    torch.manual_seed(0)
    layers: dict[str, tuple[Callable[[str | None], nn.Module], tuple[int, ...], int]] = {
        "Linear 1024->1024, batch 256": (
            lambda mode: nn.Linear(1024, 1024) if mode is None else FALinear(1024, 1024, feedback=mode),
            (256, 1024),
            1024,
        ),
        "Conv2d 64->64 3x3 on 16x16, batch 32": (
            lambda mode: nn.Conv2d(64, 64, 3, padding=1) if mode is None else FAConv2d(64, 64, 3, 1, 1, feedback=mode),
            (32, 64, 16, 16),
            64 * 16 * 16,
        ),
    }
    modes = ["bp", "random", "random_updated", "sign_concordant"]
    for title, (build, shape, classes) in layers.items():
        x = torch.randn(shape, device=device, requires_grad=True)  # grad to x: the FA path is exercised
        y = torch.randint(0, classes, (shape[0],), device=device)
        cases = {"stock": train_step(build(None).to(device), x, y)}
        cases.update({m: train_step(build(m).to(device), x, y) for m in modes})
        r = paired_ratios(cases, "stock", reps, device)
        ratios = "  ".join(f"{m}={r[m]:.3f}" for m in modes)
        print(f"{title}: FA/BP step-time ratio (median of paired reps): {ratios}")


def dense_untied_matrix(layer: UntiedConv2d, in_shape: tuple[int, int, int]) -> torch.Tensor:
    """The seed's form: a (C*H*W, O*P) mostly-zero matrix, column o*P + p = output channel o at position p."""
    c, h, w = in_shape
    positions, _, out_ch = layer.weight.shape
    index = torch.arange(c * h * w, dtype=torch.float64).view(1, c, h, w)
    rows = F.unfold(index, layer.op.kernel_size, padding=layer.op.padding, stride=layer.op.stride)[0].long()
    dense = torch.zeros(c * h * w, out_ch, positions, device=layer.weight.device)
    dense[rows, :, torch.arange(positions)] = layer.weight.detach().permute(1, 0, 2)
    return dense.view(c * h * w, out_ch * positions)


def bench_untied(device: torch.device, reps: int, batch: int = 64) -> None:
    """Seed's first untied layer: memory and fwd+bwd time, untied vs dense matrix vs nn.Conv2d."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 32, 5).to(device)
    untied = UntiedConv2d.from_conv2d(conv, 32, feedback="random")
    dense = nn.Parameter(dense_untied_matrix(untied, (3, 32, 32)))
    dense_bias = nn.Parameter(untied.bias.detach().flatten().clone())
    x = torch.randn(batch, 3, 32, 32, device=device, requires_grad=True)
    err = (x.flatten(1) @ dense + dense_bias - untied(x).flatten(1)).abs().max().item()

    def fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            x.grad = None
            fn().square().mean().backward()

        return run

    t = compare(
        {
            "untied": fwd_bwd(lambda: untied(x)),
            "dense": fwd_bwd(lambda: x.flatten(1) @ dense + dense_bias),
            "conv": fwd_bwd(lambda: conv(x)),
        },
        reps,
        device,
    )
    w_untied = untied.weight.numel() * untied.weight.element_size()
    w_dense = dense.numel() * dense.element_size()
    print(f"UntiedConv2d 3x32x32 -> 32x28x28 (5x5), batch {batch}; dense form equals untied to {err:.1e}")
    print(
        f"  weight bytes: untied {w_untied / 2**20:.2f} MiB, dense {w_dense / 2**20:.1f} MiB, "
        f"conv {conv.weight.numel() * 4 / 2**10:.1f} KiB -> dense/untied memory = {w_dense / w_untied:.1f}x "
        f"(training with FA: W + grad + B, the same ratio)"
    )
    print(
        f"  fwd+bwd: untied {t['untied'] * 1e3:.2f} ms, dense {t['dense'] * 1e3:.2f} ms, conv {t['conv'] * 1e3:.2f} ms"
        f" -> dense/untied time = {t['dense'] / t['untied']:.2f}x, untied/conv time = {t['untied'] / t['conv']:.2f}x"
    )


def _preset_step(arch: str, device: torch.device, batch: int) -> tuple[nn.Module, Callable[[], None]]:
    from fasweep.config import FeedbackConfig, ModelConfig, TrainConfig
    from fasweep.models import build_model
    from fasweep.trial import make_optimizer

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, pool="poggio"), FeedbackConfig(), (3, 32, 32), 10).to(device)
    opt = make_optimizer(model, TrainConfig())  # the trainer's Adam
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer_step(model, opt)

    return model, step


def _step_flops(step: Callable[[], None]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def _bandwidth(device: torch.device, reps: int, mib: int = 256) -> float:
    """Bytes per second read + written by a copy of `mib` MiB (far beyond the caches)."""
    src = torch.ones(mib << 18, device=device)
    dst = torch.empty_like(src)
    seconds = compare({"copy": lambda: dst.copy_(src)}, reps, device)["copy"]
    return 2 * src.numel() * src.element_size() / seconds


def _parameter_bytes(model: nn.Module) -> int:
    """Bytes an ideal step moves for the parameters: each parameter read forward, its grad written and Adam's one
    pass (param, grad, two moments read; param, moments written): 9 words; a weight whose layer sends dL/dx
    back also has B (W's shape) read: 1 word more. The first layer (fed with data) sends none back."""
    words = 9 * sum(p.numel() for p in model.parameters())
    layers = [m for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]
    words += sum(m.weight.numel() for m in layers[1:])
    return 4 * words


def _products(model: nn.Module, batch: int, device: torch.device) -> tuple[list[Callable[[], object]], int]:
    """The matrix products of the net's conv / untied layers alone and their FLOPs: forward, dL/dW and, but for
    the first layer, dL/dx; a conv as ATen's convolution kernels (oneDNN on the CPU), an untied layer as the
    `bmm`s it runs: on the CPU one output row of positions each (its chunks' operands are in cache), on CUDA one."""
    products: list[Callable[[], object]] = []
    flops = 0
    layers = [m for m in model.modules() if isinstance(m, FAConv2d | UntiedConv2d)]
    for i, layer in enumerate(layers):
        if isinstance(layer, UntiedConv2d):
            positions, features, out = layer.weight.shape
            row, n = layer.output_size[1] if device.type == "cpu" else positions, batch  # as the layer chunks
            rows = positions // row
            cols = torch.randn(row, features, n, device=device)
            w, g = torch.randn(row, features, out, device=device), torch.randn(row, n, out, device=device)
            passes = [lambda c=cols, w=w: torch.bmm(c.transpose(1, 2), w), lambda c=cols, g=g: torch.bmm(c, g)]
            if i:
                passes.append(lambda w=w, g=g: torch.bmm(w, g.transpose(1, 2)))
            products.append(lambda rows=rows, passes=passes: [f() for _ in range(rows) for f in passes])
            flops += len(passes) * 2 * positions * n * features * out
        else:
            w, op = layer.weight.detach(), layer.op
            x = torch.randn(batch, layer.in_channels, *_input_sizes(model)[i], device=device)
            y = op.forward(x, w, None)
            g = torch.randn_like(y)
            products += [lambda x=x, w=w, op=op: op.forward(x, w, None)]
            products += [lambda g=g, x=x, w=w, op=op: op.param_grads(g, x, w, True, False)]
            if i:
                products += [lambda g=g, x=x, w=w, op=op: op.input_grad(g, w, x)]
            flops += (2 + bool(i)) * 2 * y.numel() * w[0].numel()
    return products, flops


def _input_sizes(model: nn.Module) -> list[tuple[int, ...]]:
    """(H, W) of each conv / untied layer's input in a forward of one CIFAR-sized image."""
    sizes: list[tuple[int, ...]] = []
    layers = [m for m in model.modules() if isinstance(m, FAConv2d | UntiedConv2d)]
    handles = [m.register_forward_pre_hook(lambda _m, args: sizes.append(tuple(args[0].shape[-2:]))) for m in layers]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32, device=next(model.parameters()).device))
    for h in handles:
        h.remove()
    return sizes


def bench_presets(device: torch.device, reps: int, batch: int = 128) -> None:
    """PG-Untie / PG0 training step (fwd + bwd + Adam), GFLOP/s, and the limit the untied net could reach."""
    nets = {arch: _preset_step(arch, device, batch) for arch in ("PG0", "PG-Untie")}
    flops = {arch: _step_flops(step) for arch, (_, step) in nets.items()}
    products = {arch: _products(model, batch, device) for arch, (model, _) in nets.items()}
    cases: dict[str, Callable[[], object]] = {arch: step for arch, (_, step) in nets.items()}
    cases.update({f"{arch} products": lambda fs=fs: [f() for f in fs] for arch, (fs, _) in products.items()})
    times = _interleaved(cases, reps, device)  # steps and products alike, so drifts in load hit all
    t = {arch: statistics.median(v) for arch, v in times.items()}
    ratio = statistics.median(a / b for a, b in zip(times["PG-Untie"], times["PG0"], strict=True))
    gap = statistics.median(  # (PG-Untie's products - PG0's) / PG0's step, paired
        (u - p) / s for u, p, s in zip(times["PG-Untie products"], times["PG0 products"], times["PG0"], strict=True)
    )
    bandwidth = _bandwidth(device, reps)
    moved = {arch: _parameter_bytes(model) for arch, (model, _) in nets.items()}
    n_params = {arch: sum(p.numel() for p in model.parameters()) for arch, (model, _) in nets.items()}
    compute = t["PG0"] * flops["PG-Untie"] / flops["PG0"]
    extra = moved["PG-Untie"] - moved["PG0"]
    limit = compute + extra / bandwidth
    with_bmm = limit / t["PG0"] + gap  # in PG0 steps
    print(f"Preset nets, batch {batch}, fwd+bwd+Adam (median of {reps} interleaved steps):")
    for arch in nets:
        print(
            f"  {arch:9s} {t[arch] * 1e3:8.1f} ms/step  {flops[arch] / 1e9:6.2f} GFLOP/step  "
            f"{flops[arch] / t[arch] / 1e9:6.1f} GFLOP/s  {n_params[arch] / 1e6:6.2f} M params  "
            f"{moved[arch] / 1e6:6.1f} MB parameter traffic"
        )
    print(f"  PG-Untie / PG0 step: {ratio:.2f}x (paired median)")
    print(
        f"  limit {limit * 1e3:.1f} ms = {limit / t['PG0']:.2f}x PG0: {compute * 1e3:.1f} ms for PG-Untie's FLOPs at"
        f" PG0's rate + {extra / bandwidth * 1e3:.1f} ms for {extra / 1e6:.0f} MB more parameter traffic at"
        f" {bandwidth / 1e9:.1f} GB/s (a copy's); PG-Untie's step is {t['PG-Untie'] / limit:.2f}x the limit"
    )
    kernels = {arch: t[f"{arch} products"] for arch in nets}
    rates = {arch: f / kernels[arch] / 1e9 for arch, (_, f) in products.items()}
    print(
        f"  the products alone: PG0's convolutions {kernels['PG0'] * 1e3:.1f} ms ({rates['PG0']:.1f} GFLOP/s),"
        f" PG-Untie's bmms {kernels['PG-Untie'] * 1e3:.1f} ms ({rates['PG-Untie']:.1f} GFLOP/s); the limit with"
        f" the bmms' time for the convolutions': {with_bmm:.2f}x PG0, PG-Untie's step {ratio / with_bmm:.2f}x it"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["rules", "untied", "presets"], help="run one section")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, reps {args.reps}, "
        f"{TORCH_ENV}, MKL's AVX-512 path on AMD: {mkl_avx512_library()[1]}"
    )
    if args.only in (None, "rules"):
        bench_rules(device, args.reps)
    if args.only in (None, "untied"):
        bench_untied(device, max(5, args.reps // 3))
    if args.only in (None, "presets"):
        bench_presets(device, max(5, args.reps // 3))


if __name__ == "__main__":
    main()
