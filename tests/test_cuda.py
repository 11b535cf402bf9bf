"""CUDA paths (skipped without a CUDA device): untied layers, a trial with bf16/channels_last/compile, packs.

These are the checks `benchmarks/gpu_check.sh` runs on a GPU; on the CPU the same code paths are covered by
tests/test_nn.py, tests/test_train.py and tests/test_pack.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fasweep.config import TrialConfig, validate_trial
from fasweep.nn import UntiedConv2d
from fasweep.packed import train_pack
from fasweep.train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _config(seed: int = 0, **train_fields: object) -> TrialConfig:
    arch = "Conv3*3/8 Pool3*3 UntieConv3*3/8(R*) Dense32(R) Dense10(R)"
    fields = {"epochs": 2, "lr": 3e-3, "batch_size": 32, "seed": seed, "device": "cuda", **train_fields}
    return validate_trial({"data": {"name": "digits"}, "model": {"arch": arch}, "train": fields})


def test_untied_on_cuda_equals_the_cpu_and_the_tied_conv() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 5, padding=2)
    x = torch.randn(16, 3, 12, 12)
    grads = []
    for device in ("cpu", "cuda"):
        layer = UntiedConv2d.from_conv2d(conv, 12, feedback="bp").to(device)
        xd = x.to(device).requires_grad_(True)
        out = layer(xd)
        torch.testing.assert_close(out.cpu(), conv(x), rtol=1e-4, atol=1e-4)
        out.square().mean().backward()
        grads.append((xd.grad.cpu(), layer.weight.grad.cpu()))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_a_trial_learns_on_cuda_with_bf16_channels_last_and_compile() -> None:
    fp32 = train(_config())
    assert fp32.status == "finished" and fp32.final["test_acc"] > 0.6
    fast = train(_config(bf16=True, compile=True), channels_last=True)
    assert fast.status == "finished" and fast.final["test_acc"] > 0.6
    assert fast.final["test_acc"] == pytest.approx(fp32.final["test_acc"], abs=0.08)


def test_a_batched_pack_on_cuda_matches_its_trials_alone() -> None:
    configs = [_config(seed=s) for s in range(3)]
    alone = [train(c) for c in configs]
    packed = train_pack(configs, batched=True)
    for a, p in zip(alone, packed, strict=True):
        assert p.status == a.status == "finished"
        assert p.final["test_acc"] == pytest.approx(a.final["test_acc"], abs=0.03)
