"""fasweep.spec and `fasweep validate/plan`: shipped sweeps, the malformed-spec corpus, --set, sampling, stages."""

from __future__ import annotations

import ast
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fasweep.cli import main, parse_sets
from fasweep.config import TrialConfig
from fasweep.errors import UserError
from fasweep.spec import dump_spec, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "sweeps"
BAD = Path(__file__).resolve().parent / "bad_specs"
FASWEEP = [str(Path(sys.executable).parent / "fasweep")]  # the installed console script

# spec -> (trials, conditions): the counts each shipped sweep must plan to.
SHIPPED = {
    "quickstart": (6, 3),
    "dense_shallow": (30, 10),
    "dense_deep": (42, 14),
    "poggio_relu": (30, 10),
    "poggio_tanh": (15, 5),
    "untied_relu": (15, 5),
    "untied_tanh": (18, 6),
    "untied_fixed_cifar10": (33, 11),
    "untied_fixed_cifar100": (36, 12),
    "regularised": (15, 5),
    "weight_clip": (6, 2),
    "sign_concordance": (180, 60),
    "lillicrap": (12, 4),
}

SAMPLED = """
name: sampled
base: {data: {name: digits}, model: {arch: DS0}}
grid:
  feedback.mode: [bp, random]
sample:
  train.lr: {loguniform: [1.0e-4, 1.0e-2]}
  train.batch_size: {randint: [16, 20]}
  model.activation: {choice: [relu, tanh]}
num_samples: 4
seeds: [0, 1]
"""


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`fasweep ARGS` in-process through the console entry point: (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_spec_never_imports_torch() -> None:
    code = (
        "import sys; from fasweep.spec import load_spec; "
        "load_spec('sweeps/untied_fixed_cifar10.yaml'); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_shipped_spec_has_expected_counts() -> None:
    assert sorted(p.stem for p in SWEEPS.glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_spec_validates_and_expands(name: str) -> None:
    plan = load_spec(SWEEPS / f"{name}.yaml")
    spec, trials = plan.spec, plan.trials
    n_trials, n_conditions = SHIPPED[name]
    assert len(trials) == n_trials
    assert len({(t.stage, t.condition) for t in trials}) == n_conditions
    assert len({t.key for t in trials}) == n_trials
    for trial in trials:
        assert trial.key == f"{trial.stage}/{trial.condition}/s{trial.seed}"
        assert "/" not in trial.condition
        assert trial.config["train"]["seed"] == trial.seed
        for path, value in trial.overrides.items():
            node = trial.config
            for part in path.split("."):
                node = node[part]
            assert node == value, (trial.key, path)
        if trial.init_from is None:
            TrialConfig.model_validate(trial.config)
    planned = {t.condition for t in trials} | {f"{t.stage}/{t.condition}" for t in trials}
    for condition, metrics in spec.reference.items():
        assert condition in planned
        for metric, value in metrics.items():
            assert re.fullmatch(r"test_acc(@\d+)?", metric)
            assert 0.2 < value < 0.8, (condition, metric, value)  # fractions, not percent


def test_dump_spec_round_trips_the_plan() -> None:
    for name in SHIPPED:
        plan = load_spec(SWEEPS / f"{name}.yaml")
        again = parse_spec(dump_spec(plan.spec), name="dumped.yaml")
        assert again.spec.model_dump() == plan.spec.model_dump()
        assert again.trials == plan.trials and again.hash == plan.hash


def test_validate_cli_on_all_shipped_specs() -> None:
    files = sorted(str(p.relative_to(REPO)) for p in SWEEPS.glob("*.yaml"))
    out = subprocess.run([*FASWEEP, "validate", *files], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(files)
    assert "ok sweeps/dense_shallow.yaml: 30 trials (10 conditions × 3 seeds)" in lines
    assert (
        "ok sweeps/untied_fixed_cifar10.yaml: 33 trials (pg0: 1 condition × 3 seeds; untied: 10 conditions × 3 seeds)"
        in lines
    )


def test_plan_prints_trials_and_counts(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["plan", str(SWEEPS / "quickstart.yaml")], capsys)
    assert code == 0
    assert "6 trials (3 conditions × 2 seeds); GPUs at full concurrency: 0 (max_concurrent 2)" in out
    assert all(name in out for name in ("DS0", "DSR1", "DSR2-U", "model.arch=DSR2-U"))
    code, out, _ = run_cli(["plan", str(SWEEPS / "untied_fixed_cifar10.yaml")], capsys)
    assert code == 0
    assert "GPUs at full concurrency: 4 (max_concurrent 8)" in out  # 8 untied trials × 0.5 GPU
    assert "best pg0/PG0 layers [0]" in out


def test_plan_counts_gpus_per_stage() -> None:
    assert load_spec(SWEEPS / "sign_concordance.yaml").gpus_needed() == 2.0  # 8 concurrent × 0.25
    assert load_spec(SWEEPS / "weight_clip.yaml").gpus_needed() == 1.5  # no max_concurrent: all 6 at once


# --- the malformed corpus -------------------------------------------------------------------------------------


def _case(path: Path) -> tuple[list[str], str]:
    """The CLI arguments and expected error text a corpus file declares in its `# set:` / `# expect:` lines."""
    text = path.read_text()
    sets = [f"--set={m}" for m in re.findall(r"^# set: (.+)$", text, re.M)]
    expect = re.search(r"^# expect: (.+)$", text, re.M)
    assert expect, f"{path.name} lacks an '# expect:' line"
    expected = expect[1]
    rel = str(path.relative_to(REPO))
    if expected.startswith(":"):
        expected = rel + expected
    elif not expected.startswith("--set"):
        expected = str(path.parent.relative_to(REPO)) + "/" + expected
    return ["validate", rel, *sets], expected


BAD_FILES = sorted(BAD.glob("*.yaml"))
SUBPROCESS_CASES = {"unsafe_tag.yaml", "duplicate_key.yaml", "bad_set.yaml", "non_mapping.yaml"}


def test_corpus_is_broad() -> None:
    assert len(BAD_FILES) >= 12


@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: p.stem)
def test_malformed_spec_is_rejected_with_one_line(
    path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    args, expected = _case(path)
    if path.name in SUBPROCESS_CASES:
        done = subprocess.run([*FASWEEP, *args], cwd=REPO, capture_output=True, text=True)
        code, out, err = done.returncode, done.stdout, done.stderr
    else:
        code, out, err = run_cli(args, capsys)
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {expected}"), lines[0]


def test_unsafe_tag_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    text = f'name: x\nbase: !!python/object/apply:os.system ["touch {marker}"]\n'
    with pytest.raises(UserError, match=r"^s.yaml:2: base: YAML tag !!python/object/apply:os.system is not allowed"):
        parse_spec(text, name="s.yaml")
    assert not marker.exists()


def test_bad_spec_among_good_ones_fails_validate(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(
        ["validate", str(SWEEPS / "quickstart.yaml"), str(BAD / "negative_lr.yaml"), str(SWEEPS / "lillicrap.yaml")],
        capsys,
    )
    assert code == 2
    assert out.count("ok ") == 2 and err.count("error: ") == 1


def test_missing_file_and_bad_set_syntax(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["validate", "sweeps/nope.yaml"], capsys)
    assert code == 2 and "spec: got 'sweeps/nope.yaml'; expected an existing YAML file" in err
    code, _, err = run_cli(["plan", str(SWEEPS / "quickstart.yaml"), "--set", "seeds"], capsys)
    assert code == 2 and err.startswith("error: --set: got 'seeds'; expected PATH=VALUE")


# --- --set ------------------------------------------------------------------------------------------------------


def test_set_overrides_base_seeds_and_grid() -> None:
    sets = parse_sets(["base.train.epochs=1", "seeds=[0]", "base.data.name=digits"])
    trials = load_spec(SWEEPS / "quickstart.yaml", sets).trials
    assert len(trials) == 3
    assert {t.config["train"]["epochs"] for t in trials} == {1}
    assert {t.config["data"]["name"] for t in trials} == {"digits"}
    sets = parse_sets(["grid.feedback.concordance=[1.0,0.0]", "grid.model.batchnorm=[true]"])
    trials = load_spec(SWEEPS / "sign_concordance.yaml", sets).trials
    assert len(trials) == 2 * 3 * 1 * 2 * 3
    assert trials[0].condition == "concordance=1.0,magnitude=uniform,batchnorm=true,batch_manhattan=true"


def test_set_reaches_into_stages_and_dotted_condition_names() -> None:
    sets = parse_sets(["stages[1].seeds=[5]", "stages.1.conditions.dropout-0.1.model.dropout=0.2"])
    trials = load_spec(SWEEPS / "regularised.yaml", sets).trials
    later = [t for t in trials if t.stage == "regularised"]
    assert {t.seed for t in later} == {5} and len(later) == 4
    assert next(t for t in later if t.condition == "dropout-0.1").config["model"]["dropout"] == 0.2
    with pytest.raises(UserError, match=r"^--set stages\[3\]\.seeds: got 3; expected an index below 2 of stages$"):
        load_spec(SWEEPS / "regularised.yaml", {"stages[3].seeds": [1]})


def test_set_error_inside_a_trial_names_the_flag() -> None:
    with pytest.raises(UserError, match=r"^--set conditions\.DSR1\.model\.arch: got 'DSR9'; expected"):
        load_spec(SWEEPS / "quickstart.yaml", {"conditions.DSR1.model.arch": "DSR9"})
    with pytest.raises(UserError, match=r"^--set base\.train\.lr: got -1; expected greater than 0$"):
        load_spec(SWEEPS / "quickstart.yaml", {"base.train.lr": -1})


# --- sampling ---------------------------------------------------------------------------------------------------


def _sampled(text: str = SAMPLED) -> dict[str, dict]:
    return {t.key: t.overrides for t in parse_spec(text).trials}


def test_sampling_is_deterministic_and_in_range() -> None:
    plan = _sampled()
    assert plan == _sampled()
    assert len(plan) == 2 * 4 * 2
    draws = {(o["train.lr"], o["train.batch_size"], o["model.activation"]) for o in plan.values()}
    assert len(draws) == 4  # one draw per sample index, shared by both modes and both seeds
    for lr, batch, activation in draws:
        assert 1e-4 <= lr <= 1e-2 and 16 <= batch < 20 and activation in ("relu", "tanh")
    reseeded = _sampled(SAMPLED + "sample_seed: 7\n")
    assert {o["train.lr"] for o in reseeded.values()}.isdisjoint({o["train.lr"] for o in plan.values()})


def test_sampling_is_stable_under_plan_edits_and_hash_seeds() -> None:
    plan = _sampled()
    wider = _sampled(SAMPLED.replace("[bp, random]", "[bp, random, random_updated]"))
    assert {k: v for k, v in wider.items() if k in plan} == plan  # adding a grid value keeps earlier draws
    fewer = _sampled(SAMPLED.replace("  model.activation: {choice: [relu, tanh]}\n", ""))
    assert sorted(o["train.lr"] for o in fewer.values()) == sorted(o["train.lr"] for o in plan.values())
    code = (
        "import sys; from fasweep.spec import parse_spec; "
        "print(repr([t.overrides['train.lr'] for t in parse_spec(sys.stdin.read()).trials]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], input=SAMPLED, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert ast.literal_eval(out.stdout) == [o["train.lr"] for o in plan.values()]


def test_loguniform_draws_spread_in_log_space() -> None:
    text = SAMPLED.replace("num_samples: 4", "num_samples: 400").replace("seeds: [0, 1]", "seeds: [0]")
    text = text.replace("  feedback.mode: [bp, random]\n", "  feedback.mode: [bp]\n")
    logs = [math.log10(t.overrides["train.lr"]) for t in parse_spec(text).trials]
    below = sum(x < -3 for x in logs) / len(logs)  # log-uniform on [1e-4, 1e-2]: half below 1e-3
    assert 0.4 < below < 0.6


def test_condition_names_come_from_grid_values() -> None:
    trials = parse_spec(SAMPLED).trials
    assert trials[0].condition.startswith("mode=bp,sample=0,lr=")
    assert re.fullmatch(r"mode=bp,sample=0,lr=[0-9.e-]+,batch_size=1[6-9],activation=(relu|tanh)", trials[0].condition)
    single = parse_spec("name: one\nbase: {data: {name: digits}}\n").trials
    assert [t.key for t in single] == ["main/base/s0"]


# --- stages -----------------------------------------------------------------------------------------------------


def test_stage_init_from_is_symbolic_and_stage_overrides_apply() -> None:
    plan = load_spec(SWEEPS / "untied_fixed_cifar100.yaml")
    spec, trials = plan.spec, plan.trials
    first = [t for t in trials if t.stage == "pg0"]
    later = [t for t in trials if t.stage == "untied"]
    assert {t.config["train"]["epochs"] for t in first} == {100}
    assert {t.config["train"]["epochs"] for t in later} == {200}
    assert all(t.init_from is None and t.resources == {"cpu": 1.0, "gpu": 0.25} for t in first)
    for trial in later:
        assert trial.resources == {"cpu": 1.0, "gpu": 0.5}
        assert trial.init_from == {
            "stage": "pg0",
            "condition": "PG0,loss=cross_entropy",
            "layers": [0],
            "freeze": True,
            "select": "best",
            "metric": "test_acc",
            "mode": "max",
        }
        init = trial.config["model"]["init_from"]
        assert init == {"checkpoint": "stage:pg0/PG0,loss=cross_entropy", "layers": [0], "freeze": True}
    assert spec.reference_for("pg0", "PG0,loss=hinge") == {"test_acc": 0.3920}
    assert spec.reference_for("untied", "PG-Fix-Untie,loss=hinge") == {"test_acc": 0.3436}
    assert spec.axes == ["model.arch", "train.loss", "train.epochs"]


def test_stages_exclude_top_level_axes() -> None:
    text = (SWEEPS / "regularised.yaml").read_text() + "grid:\n  train.lr: [0.1]\n"
    with pytest.raises(UserError, match=r"^r\.yaml:\d+: grid: not allowed beside `stages`"):
        parse_spec(text, name="r.yaml")


def test_spec_without_source_still_gives_one_line_errors() -> None:
    from fasweep.spec import SweepSpec, _expand

    spec = SweepSpec.model_validate({"name": "x", "grid": {"train.lrr": [0.1]}})
    with pytest.raises(UserError, match=r"^<spec x>: grid\.train\.lrr: unknown field train\.lrr \(did you mean lr\?\)"):
        _expand(spec)


def test_yaml_anchors_and_merge_keys_are_plain_yaml() -> None:
    text = """
name: anchors
base: {data: {name: digits}}
conditions:
  a: &common {model.arch: DS0, train.lr: 0.01}
  b:
    <<: *common
    model.arch: DSR1
"""
    trials = parse_spec(text).trials
    assert [(t.condition, t.overrides) for t in trials] == [
        ("a", {"model.arch": "DS0", "train.lr": 0.01}),
        ("b", {"model.arch": "DSR1", "train.lr": 0.01}),
    ]


def test_colliding_condition_names_are_rejected() -> None:
    text = "name: clash\nconditions:\n  'a,root=x': {}\n  a: {}\ngrid:\n  data.root: [x, 'x,root=x']\n"
    with pytest.raises(UserError, match=r"^c\.yaml: two trials are both keyed 'main/a,root=x,root=x/s0'"):
        parse_spec(text, name="c.yaml")
