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
