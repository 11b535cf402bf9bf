"""Rule options and data set names: one registry each, checked once by `fasweep validate` and by the code using them."""

from __future__ import annotations

from pathlib import Path

import pytest

from fasweep import rule_options
from fasweep.cli import main
from fasweep.config import DataConfig, FeedbackConfig, validate_trial
from fasweep.datasets import DATASET_NAMES
from fasweep.errors import UserError
from fasweep.nn import RULES, FALinear, make_rule
from fasweep.rule_options import OPTIONS, RULE_NAMES, RULE_OPTIONS, SEED_RULES, rule_info

KP_SPEC = """\
name: kp
base:
  data: {name: digits}
  feedback: {mode: random_updated, decay: 1.5}
"""


def validate(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    try:
        main(["validate", str(spec)])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_decay_out_of_range_is_refused_by_validate_and_by_the_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = validate(tmp_path, KP_SPEC, capsys)
    assert (code, out) == (2, "")
    line = f"error: {tmp_path / 'spec.yaml'}:4: base.feedback.decay: got 1.5; expected a number in [0, 1)"
    assert err.splitlines() == [line]
    with pytest.raises(UserError, match=r"^feedback\.decay: got 1\.5; expected a number in \[0, 1\)$"):
        make_rule("random_updated", decay=1.5)
    with pytest.raises(UserError, match=r"^feedback\.decay: got 1\.5; expected a number in \[0, 1\)$"):
        FALinear(3, 3, feedback="random_updated", decay=1.5)


def test_one_check_owns_each_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """Changing the registry's check changes what the config and the rule accept, together."""
    strict = rule_options.Option(0.0, lambda v: 0.0 <= v < 0.25, "a number in [0, 0.25)", "test")
    monkeypatch.setitem(OPTIONS, "decay", strict)
    with pytest.raises(UserError, match=r"^feedback\.decay: got 0\.5; expected a number in \[0, 0\.25\)$"):
        validate_trial({"feedback": {"decay": 0.5}})
    with pytest.raises(UserError, match=r"^feedback\.decay: got 0\.5; expected a number in \[0, 0\.25\)$"):
        make_rule("random_updated", decay=0.5)
    assert validate_trial({"feedback": {"decay": 0.2}}).feedback.decay == make_rule("random_updated", decay=0.2).decay


@pytest.mark.parametrize(
    ("option", "good", "bad"),
    [
        ("init_scale", [None, 0.1, 3.0], [0.0, -1.0, float("inf"), float("nan")]),
        ("concordance", [0.0, 0.5, 1.0], [-0.1, 1.5, float("nan")]),
        ("magnitude", ["uniform", "fixed_random", "batch_random"], ["gauss"]),
        ("decay", [0.0, 0.5, 0.99], [-0.1, 1.0, float("inf")]),
    ],
)
def test_config_and_rules_agree_on_every_option(option: str, good: list, bad: list) -> None:
    mode = next(m for m, names in RULE_OPTIONS.items() if option in names and m != "bp")
    for value in good:
        assert getattr(validate_trial({"feedback": {option: value}}).feedback, option) == value
        assert make_rule(mode, **{option: value}).option_values()[option] == value
    for value in bad:
        with pytest.raises(UserError, match=rf"^feedback\.{option}: got "):
            validate_trial({"feedback": {option: value}})
        with pytest.raises(UserError, match=rf"^feedback\.{option}: got "):
            make_rule(mode, **{option: value})


def test_names_come_from_the_registries() -> None:
    assert set(RULES) == set(RULE_NAMES) == set(SEED_RULES)
    assert set(FeedbackConfig.model_fields) == {"mode", *OPTIONS}
    for name, cls in RULES.items():
        assert set(make_rule(name).option_values()) == set(RULE_OPTIONS[name]) and cls.mode == name
        assert cls.info is SEED_RULES[name] is rule_info(name) and cls.info.impl.endswith(f":{cls.__name__}")
    assert all(DataConfig(name=name).name == name for name in DATASET_NAMES)


def test_misspelt_names_suggest_the_closest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = validate(tmp_path, "name: x\nbase:\n  data: {name: fashion-mnist}\n", capsys)
    assert code == 2 and len(err.splitlines()) == 1
    line = f"error: {tmp_path / 'spec.yaml'}:3: base.data.name: got 'fashion-mnist'; expected one of cifar10"
    assert err.startswith(line)
    assert err.rstrip().endswith("(did you mean fashion_mnist?)")
    with pytest.raises(UserError, match=r"^feedback\.mode: got 'random_update'; .* \(did you mean random_updated\?\)$"):
        validate_trial({"feedback": {"mode": "random_update"}})


def test_misspelt_data_set_in_a_set_flag_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    spec = Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml"
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(spec), "--set", "base.data.name=fashion-mnist"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: --set base.data.name: got 'fashion-mnist'; expected one of cifar10")
    assert err.rstrip().endswith("(did you mean fashion_mnist?)")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("seeds: [true, '2']", ":4: seeds: got [True, '2']; expected a number at item 0, not a boolean (true/false)"),
        ("resources: {cpu: false}", ":4: resources.cpu: got False; expected a number, not a boolean"),
        ("grid: {train.lr: [0.1, true]}", ":4: grid.train.lr[1]: got True; expected a number, not a boolean"),
        ("  train: {epochs: true}", ":4: base.train.epochs: got True; expected a number, not a boolean"),
        ("  train: {l2: {dense: true}}", "base.train.l2: got {'dense': True}; expected a number at 'dense'"),
    ],
)
def test_a_boolean_is_never_read_as_a_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, line: str
) -> None:
    code, _, err = validate(tmp_path, f"name: x\nbase:\n  data: {{name: digits}}\n{text}\n", capsys)
    assert code == 2 and len(err.splitlines()) == 1 and line in err, err


def test_a_boolean_set_where_a_number_is_meant_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    spec = Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml"
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(spec), "--set", "base.train.epochs=true"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.splitlines() == [
        "error: --set base.train.epochs: got True; expected a number, not a boolean (true/false)"
    ]
    assert validate_trial({"train": {"batch_manhattan": True, "lr": "1e-3"}}).train.lr == 1e-3  # YAML 1.1's 1e-3


@pytest.mark.parametrize("mode", RULE_NAMES)
def test_layer_rules_say_what_the_built_layers_run(mode: str) -> None:
    """`layer_rules` (torch-free: validate and the run record) against the layers `assemble` builds for every preset:
    the same rule per weight layer (its mark, else feedback.mode) and the options that rule object holds."""
    import torch

    from fasweep.config import ModelConfig
    from fasweep.models import PRESETS, assemble, feedback_read, layer_rules, parse_layers, resolve_arch

    feedback = FeedbackConfig(mode=mode, init_scale=0.2, concordance=0.5, magnitude="fixed_random", decay=0.1)
    for arch in PRESETS:
        with torch.device("meta"):
            model = assemble(parse_layers(resolve_arch(arch)), ModelConfig(), feedback, (3, 32, 32), 10, seed=0)
        weights = [(name, m.rule) for name, m in model.named_children() if hasattr(m, "rule")]
        built = [(name, rule.mode, rule.option_values()) for name, rule in weights]
        rules = layer_rules(arch, feedback.model_dump())
        assert [(r.layer, r.rule, dict(r.options)) for r in rules] == built, arch
        unmarked = any(r.rule == mode and not r.marked for r in rules)
        options = {option for _, _, opts in built for option in opts}
        assert feedback_read(rules) == ({"mode"} if unmarked else set()) | options, arch


@pytest.mark.parametrize(
    ("arch", "mode", "layers"),
    [  # read off the seed report's tables by hand: marked layers keep their mark, the rest take the mode
        ("DSR1", "sign_concordant", "dense0:sign_concordant dense1:sign_concordant dense2:random"),
        ("DSR2-U", "bp", "dense0:bp dense1:random_updated dense2:random_updated"),
        ("PGR3-Untie", "dfa", "untie0:dfa untie2:dfa untie4:random dense6:random dense7:random"),
        ("Dense64(bp) Dense10", "random", "dense0:bp dense1:random"),
    ],
)
def test_layer_rules_read_the_marks(arch: str, mode: str, layers: str) -> None:
    from fasweep.models import layer_rules, rules_text

    assert rules_text(layer_rules(arch, FeedbackConfig(mode=mode).model_dump())) == layers


NO_EFFECT = "expected a setting some layer reads: the layers of DS0 run dense0:bp dense1:bp dense2:bp"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--set", "feedback.concordance=0.0"], f"--set feedback.concordance: got 0.0; {NO_EFFECT}"),
        (["--feedback", "bp", "--set", "feedback.decay=0.1"], f"--set feedback.decay: got 0.1; {NO_EFFECT}"),
        (["--model", "Dense10(R)", "--feedback", "random"], "--feedback: got 'random'; expected a setting some layer"),
    ],
)
def test_train_refuses_a_feedback_setting_no_layer_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], line: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / "out"), *args])
    out, err = capsys.readouterr()
    assert (exc.value.code, out) == (2, "") and len(err.splitlines()) == 1
    assert err.startswith(f"error: {line}") and "to make it count: " in err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_options_some_condition_reads_are_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A base option read by one condition only, and axes over the options of the rules each condition runs."""
    spec = """\
name: read
base: {data: {name: digits}, feedback: {decay: 0.1, init_scale: 0.5}}
conditions:
  DS0: {model.arch: DS0}
  DSR1-U: {model.arch: DSR1-U}
  SC: {model.arch: Dense32 Dense10, feedback.mode: sign_concordant, feedback.concordance: 0.5}
"""
    assert validate(tmp_path, spec, capsys) == (
        0,
        "ok " + str(tmp_path / "spec.yaml") + ": 3 trials (3 conditions × 1 seed)\n",
        "",
    )
    grid = "name: g\nbase: {data: {name: digits}, model: {arch: DSR2-U}}\ngrid: {feedback.decay: [0.0, 0.1]}\n"
    assert validate(tmp_path, grid, capsys)[0] == 0
