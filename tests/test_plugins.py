"""A researcher's own rule, model and data set (examples/plugin), named by import path or by entry point: validated
in one line each, trained like fasweep's own; `code:` / `--code` make the package importable."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fasweep.cli import main
from fasweep.config import validate_trial
from fasweep.data import load_data
from fasweep.errors import UserError
from fasweep.models import build_model
from fasweep.nn import FALayer
from fasweep.nn.rules import Backprop, RandomFeedback
from fasweep.train import train

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "plugin"
MODULE = __name__  # `test_plugins`: pytest puts tests/ on sys.path


@pytest.fixture
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """examples/plugin importable and its entry points installed, as `pip install -e examples/plugin` would: a
    dist-info folder with the pyproject's entry points on sys.path."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    dist = tmp_path / "site" / f"fasweep_example-{project['version']}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = project["entry-points"]
    text = "".join(f"[{g}]\n" + "".join(f"{n} = {v}\n" for n, v in eps.items()) + "\n" for g, eps in groups.items())
    (dist / "entry_points.txt").write_text(text)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield tmp_path


def _validate(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    try:
        main(["validate", str(spec), *args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("feedback: {mode: ", "nosuch.rules:Mirror}", "got 'nosuch.rules:Mirror'; expected an importable module (no "),
        (
            "feedback: {mode: ",
            "fasweep_example.models:lenet}",
            "got 'fasweep_example.models:lenet'; expected a FeedbackRule subclass (fasweep.nn.FeedbackRule), not a "
            "function",
        ),
        (
            "feedback: {sign_scale: -1, mode: ",
            "fasweep_example.rules:ScaledSign}",
            "base.feedback.sign_scale: got -1; expected a positive number",
        ),
        ("model: {arch: ", "fasweep_example.models:torch}", "expected a function returning an nn.Module, not a module"),
        ("data: {name: ", "fasweep_example.data:nope}", "expected an attribute of module fasweep_example.data (it "),
        (
            "feedback: {mode: ",
            "broken.rules:Rule}",
            "expected a module that imports (ZeroDivisionError: division by zero)",
        ),
        ("feedback: {mode: ", "scaled_sgn}", "(did you mean scaled_sign?)"),
    ],
)
def test_validate_says_in_one_line_what_is_wrong_with_users_code(
    example: Path, capsys: pytest.CaptureFixture[str], field: str, value: str, expected: str
) -> None:
    (example / "broken").mkdir()
    (example / "broken" / "rules.py").write_text("RATE = 1 / 0\n")
    code, err = _validate(example, f"name: x\ncode: [broken]\nbase:\n  {field}{value}\n", capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {example / 'spec.yaml'}:4: base.") and expected in err, err


def test_registered_names_and_import_paths_train_a_users_model_data_and_rule(example: Path) -> None:
    by_name = validate_trial(
        {
            "data": {"name": "blobs"},
            "model": {"arch": "lenet", "rules": {"fc3": "bp", "features.3": "random"}},
            "feedback": {"mode": "scaled_sign", "sign_scale": 2.0},
            "train": {"epochs": 2, "batch_size": 64, "seed": 3},
        }
    )
    data = load_data(by_name.data)
    assert (data.input_shape, data.num_outputs, data.x_train.dtype) == ((1, 8, 8), 4, torch.uint8)
    torch.manual_seed(3)
    model = build_model(by_name.model, by_name.feedback, data.input_shape, data.num_outputs, seed=3)
    rules = {name: type(m.rule).__name__ for name, m in model.named_modules() if isinstance(m, FALayer)}
    assert rules == {
        "features.0": "ScaledSign",
        "features.3": "RandomFeedback",
        "fc1": "ScaledSign",
        "fc2": "ScaledSign",
        "fc3": "Backprop",
    }
    fc1 = model.get_submodule("fc1")
    w = fc1.weight.detach()
    assert torch.equal(fc1.rule.matrix(w), torch.sign(w) * (w.abs().mean() * 2.0))
    assert isinstance(model.get_submodule("features.3").rule, RandomFeedback)
    assert isinstance(model.get_submodule("fc3").rule, Backprop)
    # W is the user's model's own init under the trial seed, whatever the rules (the rules draw from their streams)
    by_path = by_name.model_copy(
        update={
            "model": by_name.model.model_copy(update={"arch": "fasweep_example.models:lenet", "rules": {}}),
            "feedback": validate_trial({"feedback": {"mode": "random"}}).feedback,
        }
    )
    torch.manual_seed(3)
    other = build_model(by_path.model, by_path.feedback, data.input_shape, data.num_outputs, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters(), strict=True))
    result = train(by_name)
    assert result.status == "finished" and len(result.history) == 2
    angles = {k for k in result.final if k.startswith("angle/")}
    assert angles == {f"angle/{n}" for n in rules}
    assert result.final["angle/fc3"] == 0.0 and result.final["angle/features.0"] > 0.0


def not_a_model(input_shape: tuple[int, ...], num_outputs: int) -> int:
    return 42


def test_a_users_model_that_breaks_its_contract_is_one_line(example: Path) -> None:
    data = load_data(validate_trial({"data": {"name": "blobs"}}).data)

    def build(model: dict[str, object]) -> None:
        config = validate_trial({"model": model})
        build_model(config.model, config.feedback, data.input_shape, data.num_outputs)

    with pytest.raises(UserError, match=r"^model\.arch: got 'test_plugins:not_a_model'; expected a function return"):
        build({"arch": f"{MODULE}:not_a_model"})
    with pytest.raises(UserError, match=r"^model\.rules: got \['fc9'\]; expected module names of its Linear/Conv2d"):
        build({"arch": "lenet", "rules": {"fc9": "bp"}})
    with pytest.raises(UserError, match=r"^model\.rules: .* with a layer string \(mark its layers instead\)$"):
        build({"arch": "DS0", "rules": {"dense0": "bp"}})
    with pytest.raises(UserError, match=r"^model\.rules: got .*; expected one of bp, random"):
        validate_trial({"model": {"arch": "lenet", "rules": {"fc1": "randm"}}})


def tiny(root: str | None = None) -> tuple[list[tuple[Image.Image, int]], list[tuple[Image.Image, int]]]:
    """A torchvision-style data set: (PIL image, label) pairs, RGB 4x4, label = the brightest channel."""
    rng = np.random.default_rng(0)

    def split(n: int) -> list[tuple[Image.Image, int]]:
        pixels = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
        return [(Image.fromarray(p), int(p.reshape(-1, 3).sum(0).argmax())) for p in pixels]

    return split(60), split(20)


def test_a_torchvision_style_data_set_loads_as_uint8_images(example: Path) -> None:
    data = load_data(validate_trial({"data": {"name": f"{MODULE}:tiny"}}).data)
    train_set, _ = tiny()
    assert (data.input_shape, data.num_outputs, data.x_train.shape[0], data.x_test.shape[0]) == ((3, 4, 4), 3, 60, 20)
    first = torch.from_numpy(np.array(train_set[0][0])).permute(2, 0, 1)
    assert torch.equal(data.x_train[0], first) and int(data.y_train[0]) == train_set[0][1]


def test_code_folders_are_checked_and_made_importable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    package = tmp_path / "project" / "ownpkg"
    package.mkdir(parents=True)
    (package / "rules.py").write_text(
        "from fasweep.nn.rules import Backprop\n\n\nclass Same(Backprop):\n    mode = 'same'\n"
    )
    text = "name: x\ncode: [ownpkg, nowhere]\nbase:\n  feedback: {mode: 'ownpkg.rules:Same'}\n"
    code, err = _validate(tmp_path, text, capsys)  # relative to the spec's folder: neither is there
    expected = "expected a folder of your Python package, relative to the spec's folder"
    assert (code, err) == (2, f"error: {tmp_path / 'spec.yaml'}:2: code[0]: got 'ownpkg'; {expected}\n")
    code, err = _validate(tmp_path, text.replace("code: [ownpkg, nowhere]\n", ""), capsys)
    assert code == 2 and "no module named ownpkg" in err
    code, err = _validate(tmp_path, text.replace("[ownpkg, nowhere]", "[project/ownpkg]"), capsys)
    assert (code, err) == (0, "")
    code, err = _validate(tmp_path, text, capsys, "--code", str(package))  # replaces the spec's code:
    assert (code, err) == (0, "")
