"""fasweep.train and `fasweep train`/`fasweep models`: real data (digits, Lillicrap's linear task), real torch."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow.fs
import pytest
import torch

from fasweep.checkpoints import CheckpointFolder, newest_checkpoint
from fasweep.cli import main
from fasweep.config import CheckpointPolicy, TrialConfig, validate_trial
from fasweep.data import load_data
from fasweep.errors import UserError
from fasweep.models import build_model
from fasweep.runs.layout import CHECKPOINT_FILE, HISTORY_FILE, epoch_marker
from fasweep.train import make_loss, train
from fasweep.trial import TrialState, make_optimizer

TIMING = {"epoch_time_s"}


def _config(**sections: dict[str, Any]) -> TrialConfig:
    base: dict[str, Any] = {"data": {"name": "digits"}, "model": {"arch": "DSR1"}, "train": {"epochs": 2}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return validate_trial(base)


def _untimed(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def _saved(folder: Path) -> Path:
    """The newest checkpoint file a trial wrote to `folder`."""
    path = newest_checkpoint(folder, folder)
    assert path is not None, f"no checkpoint in {folder}"
    return path


def test_digits_with_random_feedback_learns() -> None:
    result = train(_config(train={"epochs": 3, "batch_size": 32}))
    assert result.status == "finished"
    assert [h["epoch"] for h in result.history] == [1.0, 2.0, 3.0]
    assert result.final["test_acc"] > 0.85
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert {"train_acc", "test_loss", "lr", "diverged", "epoch_time_s", "angle/dense2"} <= result.final.keys()
    assert all(isinstance(v, float) and math.isfinite(v) for v in result.final.values())


def test_linear_task_fa_angle_below_90_and_matches_explicit_products(tmp_path: Path) -> None:
    cfg = validate_trial(
        {
            "data": {"name": "linear"},
            "model": {"arch": "Dense20 Dense10", "activation": "linear"},
            "feedback": {"mode": "random"},
            "train": {"epochs": 3, "batch_size": 64, "optimizer": "sgd", "lr": 0.02, "momentum": 0.0},
        }
    )
    result = train(cfg, checkpoint_dir=tmp_path)
    losses = [h["train_loss"] for h in result.history]
    angles = [h["angle/dense0"] for h in result.history]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.5 * losses[0]
    assert angles[-1] < 90.0 and angles[-1] < angles[0]
    # the same angle from the final weights by explicit matrix products on the probe batch (256 test pairs)
    state = torch.load(_saved(tmp_path), weights_only=True)["model"]
    data = load_data(cfg.data)
    x, y = data.x_test[:256].double(), data.y_test[:256].double()
    w1, b1, w2, b2 = (state[k].double() for k in ("dense0.weight", "dense0.bias", "dense1.weight", "dense1.bias"))
    b_fb = state["dense1.rule.B"].double()
    e = 2 * ((x @ w1.T + b1) @ w2.T + b2 - y) / y.numel()  # dMSE/d(output)
    grad_bp, grad_fa = (e @ w2).T @ x, (e @ b_fb).T @ x
    cos = (grad_bp * grad_fa).sum() / (grad_bp.norm() * grad_fa.norm())
    assert math.degrees(math.acos(float(cos))) == pytest.approx(angles[-1], abs=1e-3)


def test_resume_after_interruption_continues_bitwise(tmp_path: Path) -> None:
    cfg = _config(
        model={"arch": "Dense64(sign_concordant) Dense32(R*) Dense10(R)", "dropout": 0.1, "batchnorm": True},
        feedback={"magnitude": "batch_random"},
        train={"epochs": 3, "schedule": "cosine", "batch_size": 50},
        data={"augment": True, "limit_train": 500},
    )
    whole = train(cfg, checkpoint_dir=tmp_path / "whole")

    class Interrupted(Exception):
        pass

    def crash_after_two(metrics: dict[str, float], saved: str | None) -> None:
        assert saved is not None and (Path(saved) / CHECKPOINT_FILE).is_file()
        if metrics["epoch"] == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(cfg, checkpoint_dir=tmp_path / "cut", on_epoch=crash_after_two)
    seen: list[float] = []
    resumed = train(
        cfg,
        checkpoint_dir=tmp_path / "cut",
        resume_from=_saved(tmp_path / "cut"),
        on_epoch=lambda m, _: seen.append(m["epoch"]),
    )
    assert seen == [3.0]
    assert _untimed(resumed.history) == _untimed(whole.history)
    a = torch.load(_saved(tmp_path / "whole"), weights_only=True)["model"]
    b = torch.load(_saved(tmp_path / "cut"), weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = cfg.model_copy(update={"feedback": cfg.feedback.model_copy(update={"mode": "random"})})
    with pytest.raises(UserError, match=r"resume_from: .* differs in \['feedback.mode'\]"):
        train(other, resume_from=_saved(tmp_path / "cut"))


def test_alignment_probe_leaves_training_unchanged(tmp_path: Path) -> None:
    # batch_random draws B's magnitudes from the RNG for every batch: the probe must not consume any of it
    def run(every: int) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
        cfg = _config(
            model={"arch": "Dense32(sign_concordant) Dense16(sign_concordant) Dense10"},
            feedback={"magnitude": "batch_random"},
            train={"epochs": 2, "batch_size": 50, "alignment_every": every},
            data={"limit_train": 300},
        )
        result = train(cfg, checkpoint_dir=tmp_path / str(every))
        history = [{k: v for k, v in h.items() if "angle" not in k and "ratio" not in k} for h in result.history]
        return _untimed(history), torch.load(_saved(tmp_path / str(every)), weights_only=True)["model"]

    (probed, a), (plain, b) = run(1), run(0)
    assert probed == plain
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_divergence_ends_the_trial_with_its_history(tmp_path: Path) -> None:
    calls: list[dict[str, float]] = []
    cfg = _config(train={"epochs": 5, "optimizer": "sgd", "lr": 1e12, "momentum": 0.0})
    result = train(cfg, checkpoint_dir=tmp_path, on_epoch=lambda m, _: calls.append(m))
    assert result.status == "diverged"
    assert result.history == calls and len(calls) < 5
    assert result.final["diverged"] == 1.0 and not math.isfinite(result.final["train_loss"])
    assert all(h["diverged"] == 0.0 for h in result.history[:-1])
    saved = torch.load(_saved(tmp_path), weights_only=True)
    assert saved["status"] == "diverged" and len(saved["history"]) == len(calls)
    again = train(cfg, resume_from=_saved(tmp_path))
    assert again.status == "diverged" and len(again.history) == len(calls)


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 1e307), ("nesterov", 1e39), ("adam", 1e38)])
def test_an_update_that_overflows_float32_ends_the_trial_diverged(tmp_path: Path, optimizer: str, lr: float) -> None:
    """An lr float32 cannot hold (Adam's first step scales it by 10) cannot be applied as a step; the trial ends
    `diverged` at its first batch, with its initial weights and a finite loss, not with an error."""
    cfg = _config(model={"arch": "Dense16 Dense10(R)"}, train={"epochs": 3, "optimizer": optimizer, "lr": lr})
    result = train(cfg, checkpoint_dir=tmp_path)
    assert result.status == "diverged" and len(result.history) == 1 and result.final["diverged"] == 1.0
    assert math.isfinite(result.final["train_loss"]) and math.isfinite(result.final["test_acc"])
    data = load_data(cfg.data, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    initial = build_model(cfg.model, cfg.feedback, data.input_shape, data.num_outputs, cfg.train.seed).state_dict()
    saved = torch.load(_saved(tmp_path), weights_only=True)
    assert saved["status"] == "diverged" and all(torch.equal(saved["model"][k], initial[k]) for k in initial)


def test_checkpoints_are_written_only_when_due_straight_into_the_trials_folder(tmp_path: Path) -> None:
    cfg = _config(
        model={"arch": "Dense16 Dense10"}, train={"epochs": 5, "alignment_every": 0}, data={"limit_train": 200}
    )
    written: dict[float, str | None] = {}
    policy = CheckpointPolicy(every_epochs=2, keep=2)
    train(
        cfg, checkpoint_dir=tmp_path / "t", checkpointing=policy, on_epoch=lambda m, s: written.update({m["epoch"]: s})
    )
    due = [2, 4, 5]  # every 2 epochs, and the last
    assert written == {e: str(tmp_path / "t" / epoch_marker(e)) if e in due else None for e in range(1, 6)}
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [epoch_marker(4), epoch_marker(5)]  # the newest 2
    for epoch in (4, 5):
        folder = tmp_path / "t" / epoch_marker(epoch)
        assert sorted(p.name for p in folder.iterdir()) == [CHECKPOINT_FILE, HISTORY_FILE]
        assert torch.load(folder / CHECKPOINT_FILE, weights_only=True)["epoch"] == epoch
        assert len(json.loads((folder / HISTORY_FILE).read_text())) == epoch
    train(cfg, checkpoint_dir=tmp_path / "last", checkpointing=CheckpointPolicy(every_epochs=100))
    assert [p.name for p in (tmp_path / "last").iterdir()] == [epoch_marker(5)]
    train(
        cfg,
        checkpoint_dir=tmp_path / "timed",
        checkpointing=CheckpointPolicy(every_epochs=100, every_seconds=1e-6, keep=9),
    )
    assert len(list((tmp_path / "timed").iterdir())) == 5  # every epoch: a microsecond has always passed


def test_a_resumed_trial_rewrites_the_epochs_it_replays_and_drops_what_killed_writes_left(tmp_path: Path) -> None:
    cfg = _config(
        model={"arch": "Dense16 Dense10"}, train={"epochs": 4, "alignment_every": 0}, data={"limit_train": 200}
    )
    whole = train(cfg, checkpoint_dir=tmp_path / "whole")
    folder = tmp_path / "trial"
    train(cfg, checkpoint_dir=folder, checkpointing=CheckpointPolicy(keep=4))
    (folder / f".{epoch_marker(3)}.dead.tmp").mkdir()  # a write killed before its rename
    replayed = train(cfg, checkpoint_dir=folder, resume_from=folder / epoch_marker(2) / CHECKPOINT_FILE)
    assert _untimed(replayed.history) == _untimed(whole.history)
    assert sorted(p.name for p in folder.iterdir()) == [
        epoch_marker(3),
        epoch_marker(4),
    ]  # keep 2: rewritten, nothing else
    a = torch.load(_saved(tmp_path / "whole"), weights_only=True)["model"]
    b = torch.load(_saved(folder), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_where_folders_cannot_be_renamed_a_checkpoint_is_written_in_place_checkpoint_last(tmp_path: Path) -> None:
    # an object store (s3://) has no folder rename: a filesystem that is not the local one takes that path
    folder = CheckpointFolder(tmp_path / "t")
    folder.fs, folder.path = pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem()), "t"
    folder.on_disk = False
    (tmp_path / "t" / epoch_marker(4)).mkdir(parents=True)
    (tmp_path / "t" / epoch_marker(4) / HISTORY_FILE).write_text("[]")  # a write killed before its checkpoint
    assert folder.epochs() == []
    for epoch in (1, 2, 3):
        folder.write(epoch, b"[]", f"state {epoch}".encode(), keep=2)
    assert folder.epochs() == [3, 2]
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [epoch_marker(2), epoch_marker(3)]
    copy = folder.local(3, tmp_path / "copy")
    assert copy.parent == tmp_path / "copy" and (copy / CHECKPOINT_FILE).read_bytes() == b"state 3"


def test_init_from_freezes_layers_and_keeps_them_unchanged(tmp_path: Path) -> None:
    source = _config(model={"arch": "Conv3*3/8 Pool3*3 Dense32 Dense10"}, train={"epochs": 1})
    train(source, checkpoint_dir=tmp_path / "src")
    src = torch.load(_saved(tmp_path / "src"), weights_only=True)["model"]
    init = {"checkpoint": str(_saved(tmp_path / "src")), "layers": [0, "dense2"]}
    target = _config(model={"arch": "FixConv3*3/8 Pool3*3 Dense32(R) Dense10(R)", "init_from": init})
    train(target, checkpoint_dir=tmp_path / "dst")
    dst = torch.load(_saved(tmp_path / "dst"), weights_only=True)["model"]
    for src_key, dst_key in [("conv0", "fixconv0"), ("dense2", "dense2")]:
        for p in ("weight", "bias"):
            assert torch.equal(dst[f"{dst_key}.{p}"], src[f"{src_key}.{p}"])
    assert not torch.equal(dst["dense3.weight"], src["dense3.weight"])


# --- bf16 autocast, channels_last and torch.compile on the CPU -----------------------------------------
CONV = "Conv3*3/8 Conv3*3/8(sign_concordant) Pool3*3 UntieConv3*3/4(R*) Dense10(R)"
QUICK = {"epochs": 3, "lr": 3e-3, "batch_size": 32}


def _close(history: list[dict[str, float]], reference: list[dict[str, float]], rel: float) -> None:
    """Every metric of every epoch within `rel` (angles near 0 within 1e-3 degrees)."""
    got, want = _untimed(history), _untimed(reference)
    assert [h.keys() for h in got] == [h.keys() for h in want]
    for g, w in zip(got, want, strict=True):
        assert g == {k: pytest.approx(v, rel=rel, abs=1e-3 if "angle" in k else 1e-6) for k, v in w.items()}


def test_bf16_autocast_and_channels_last_run_on_the_cpu() -> None:
    cfg = _config(model={"arch": CONV}, feedback={"mode": "random"}, train=QUICK)
    fp32 = train(cfg)
    bf16 = train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"bf16": True})}))
    assert bf16.status == "finished" and bf16.final["test_acc"] > 0.7
    assert bf16.final["test_acc"] == pytest.approx(fp32.final["test_acc"], abs=0.05)
    assert bf16.final["test_loss"] != fp32.final["test_loss"]  # bf16 did run
    trial = TrialState(cfg, load_data(cfg.data), torch.device("cpu"), None, alone=True, channels_last=True)
    assert trial.model.get_submodule("conv1").weight.stride() == (72, 1, 24, 8)  # (O, C, kh, kw) as channels_last
    # the same fp32 maths in another memory layout: only the kernels' summation order differs
    _close(train(cfg, channels_last=True).history, fp32.history, rel=1e-3)


def test_compiled_trial_learns_and_matches_eager_on_the_cpu() -> None:
    cfg = _config(model={"arch": "Dense32(sign_concordant) Dense16(R*) Dense10(R)"}, train=QUICK)
    eager = train(cfg)
    torch._dynamo.reset()
    compiled = train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": True})}))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # inductor did compile the net
    assert compiled.final["test_acc"] > 0.6  # chance: 0.1
    # fp32 under inductor: fused kernels only reorder float sums
    _close(compiled.history, eager.history, rel=1e-5)


def test_l2_per_layer_group_and_loss_choice() -> None:
    cfg = _config(model={"arch": "Conv3*3/4 Pool3*3 UntieConv3*3/4 Dense10"}, train={"l2": {"conv": 0.1, "dense": 0.3}})
    from fasweep.models import build_model

    model = build_model(cfg.model, cfg.feedback, (1, 8, 8), 10)
    decay = {id(p): g["weight_decay"] for g in make_optimizer(model, cfg.train).param_groups for p in g["params"]}
    expected = {"conv0.weight": 0.1, "untie2.weight": 0.0, "dense3.weight": 0.3, "conv0.bias": 0.0, "dense3.bias": 0.0}
    assert {n: decay[id(p)] for n, p in model.named_parameters() if n in expected} == expected
    assert isinstance(make_loss("hinge", "classification"), torch.nn.MultiMarginLoss)
    assert isinstance(make_loss("cross_entropy", "regression"), torch.nn.MSELoss)
    with pytest.raises(UserError, match=r"train.loss: got 'hinge'"):
        make_loss("hinge", "regression")


def test_cli_train_writes_metrics_and_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "trial.yaml"
    config.write_text("data: {name: digits}\ntrain: {epochs: 3, batch_size: 64}\n")
    argv = ["train", "--config", str(config), "--model", "DSR1", "--epochs", "1", "--out", str(tmp_path / "out")]
    main([*argv, "--set", "train.lr=0.002", "--set", "feedback.mode=random"])
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1.0
    saved = torch.load(tmp_path / "out" / epoch_marker(1) / CHECKPOINT_FILE, weights_only=True)
    assert saved["config"]["train"]["lr"] == 0.002 and saved["config"]["feedback"]["mode"] == "random"
    assert saved["config"]["train"]["batch_size"] == 64
    assert "finished after 1 epochs" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.lr=-1"], "error: train.lr: got -1; expected greater than 0"),
        (
            ["--set", "train.lrr=1"],
            "error: train.lrr: unknown field (did you mean lr?); expected one of optimizer, lr,",
        ),
        (["--set", "lr"], "error: --set: got 'lr'; expected PATH=VALUE"),
        (["--model", "DSR9"], "error: model.arch: got 'DSR9'; expected did you mean"),
        (["--model", "Dense10 Conv3x/4 Dense10"], "error: model.arch token 1: got 'Conv3x/4'"),
        (["--config", "nowhere.yaml"], "error: --config: got 'nowhere.yaml'; expected an existing"),
    ],
)
def test_cli_train_rejects_bad_input_with_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--dataset", "digits", "--epochs", "1", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err


def test_cli_models_lists_presets_with_parameter_counts(capsys: pytest.CaptureFixture[str]) -> None:
    main(["models"])
    out = capsys.readouterr().out
    ds0 = 3072 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10  # written out for CIFAR-10's 3x32x32 input
    assert f"{ds0:,}" in out
    assert "PG-Fix-Untie-R3-U" in out and "Dense512 Dense256(R*) Dense10(R*)" in out
