"""fasweep.spec and `fasweep validate/plan`: shipped sweeps, the malformed-spec corpus, --set, sampling, stages."""

from __future__ import annotations

import ast
import math
import os
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from fasweep.cli import main, parse_sets
from fasweep.config import TrialConfig
from fasweep.errors import UserError
from fasweep.spec import checks, reading
from fasweep.spec.model import SweepSpec
from fasweep.spec.plan import dump_spec, expand, load_spec, parse_spec, plan_difference

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
        "import sys; from fasweep.spec.plan import parse_spec; "
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


CONTRASTED = """
name: contrasted
base: {data: {name: digits}}
seeds: [0, 1]
pairing: seed
equivalence_margin: 0.01
compare: {model.arch: DD0}
stages:
  - name: pre
    conditions: {DD0: {model.arch: DD0}, DDR4: {model.arch: DDR4}}
    grid: {train.loss: [cross_entropy, hinge]}
  - name: post
    conditions: {DD0: {model.arch: DD0}, DDR1: {model.arch: DDR1}}
    compare_to: DDR1
    pairing: none
    contrasts: [[DDR1, "pre/DD0,loss=hinge"]]
"""


def test_declared_contrasts_hold_every_other_axis_fixed() -> None:
    """The spec's `compare` pairs each condition with its twin that differs only in model.arch (hinge with hinge);
    stage post's own compare_to wins there; its contrast names resolve in the stage first, then `stage/cond`."""
    plan = parse_spec(CONTRASTED)
    got = {(c.condition, c.baseline, c.pairing, c.declared_by) for c in plan.contrasts}
    assert got == {
        ("pre/DDR4,loss=cross_entropy", "pre/DD0,loss=cross_entropy", "seed", "compare"),
        ("pre/DDR4,loss=hinge", "pre/DD0,loss=hinge", "seed", "compare"),
        ("post/DD0", "post/DDR1", "none", "compare_to"),
        ("post/DDR1", "pre/DD0,loss=hinge", "none", "contrasts"),
    }
    assert plan.spec.equivalence_margin == 0.01
    with pytest.raises(UserError, match=r"equivalence_margin: .*greater than 0"):
        parse_spec(CONTRASTED.replace("equivalence_margin: 0.01", "equivalence_margin: 0"))


GRID_CONTRASTS = """
name: grid_contrasts
base: {data: {name: digits}}
conditions: {DS0: {model.arch: DS0}, DSR1: {model.arch: DSR1}, DSR2: {model.arch: DSR2}}
grid: {train.loss: [cross_entropy, hinge]}
compare: {model.arch: DS0}
contrasts: [[DSR2, DSR1], ["DS0,loss=hinge", "DS0,loss=cross_entropy"]]
"""


def test_bare_condition_contrast_holds_the_grid_fixed() -> None:
    """`[DSR2, DSR1]` in a grid sweep is one contrast per grid cell (hinge with hinge); full names contrast across the
    grid; a full name pins a bare other side to its cell; DSR2 may be X of several comparisons (vs DS0 by `compare`,
    vs DSR1 here); the same X − Y twice (here through the expansion) is refused with one line."""
    plan = parse_spec(GRID_CONTRASTS)
    assert [(c.condition, c.baseline) for c in plan.contrasts if c.declared_by == "contrasts"] == [
        ("DSR2,loss=cross_entropy", "DSR1,loss=cross_entropy"),
        ("DSR2,loss=hinge", "DSR1,loss=hinge"),
        ("DS0,loss=hinge", "DS0,loss=cross_entropy"),
    ]
    assert {(c.condition, c.baseline) for c in plan.contrasts if c.declared_by == "compare"} == {
        (f"{a},loss={loss}", f"DS0,loss={loss}") for a in ("DSR1", "DSR2") for loss in ("cross_entropy", "hinge")
    }
    pinned = parse_spec(GRID_CONTRASTS.replace("[DSR2, DSR1], ", '[DSR2, "DSR1,loss=hinge"], '))
    assert next((c.condition, c.baseline) for c in pinned.contrasts if c.declared_by == "contrasts") == (
        "DSR2,loss=hinge",
        "DSR1,loss=hinge",
    )
    twice = GRID_CONTRASTS.replace("[DSR2, DSR1], ", '[DSR2, DSR1], ["DSR2,loss=hinge", DSR1], ')
    with pytest.raises(UserError) as err:
        parse_spec(twice, name="g.yaml")
    assert str(err.value) == (
        "g.yaml:7: contrasts[1]: got ['DSR2,loss=hinge', 'DSR1,loss=hinge']; expected each comparison declared "
        "once; contrasts[0] declares DSR2,loss=hinge − DSR1,loss=hinge already"
    )
    with pytest.raises(
        UserError, match=r"contrasts\[0\]\[1\]: got 'DSR9'; expected a planned condition name .*: DS0, "
    ):
        parse_spec(GRID_CONTRASTS.replace("[DSR2, DSR1]", "[DSR2, DSR9]"))


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
            "metric": "val_acc",
            "mode": "max",
        }
        init = trial.config["model"]["init_from"]
        assert init == {"checkpoint": "stage:pg0/PG0,loss=cross_entropy", "layers": [0], "freeze": True}
    assert spec.reference_for("pg0", "PG0,loss=hinge") == {"test_acc@100": 0.3920}
    assert spec.reference_for("untied", "PG-Fix-Untie,loss=hinge") == {"test_acc@200": 0.3436}
    assert spec.axes == ["model.arch", "train.loss", "train.epochs"]


SELECTING = """
name: sel
base: {data: {name: digits, val_fraction: 0.1}, model: {arch: Dense32 Dense10}}
stages:
  - name: pre
    conditions: {A: {train.lr: 0.003}}
  - name: fine
    init_from: {stage: pre, condition: A}
"""


def test_init_from_selects_on_validation_data_where_a_split_exists() -> None:
    plan = parse_spec(SELECTING, name="sel.yaml")  # metric unset: the validation one
    assert {t.init_from["metric"] for t in plan.trials if t.stage == "fine"} == {"val_acc"}
    assert plan.warnings() == []
    asked = SELECTING.replace("condition: A}", "condition: A, metric: test_acc}")
    with pytest.raises(UserError) as refused:
        parse_spec(asked, name="sel.yaml")
    assert str(refused.value).startswith("sel.yaml:8: stages[1].init_from.metric: got 'test_acc'; expected val_acc;")
    assert "\n" not in str(refused.value)
    with pytest.raises(UserError, match=r"^--set stages\[1\]\.init_from\.metric: got 'test_loss'; expected val_loss"):
        parse_spec(SELECTING, {"stages[1].init_from.metric": "test_loss"}, name="sel.yaml")
    last = parse_spec(asked.replace("metric: test_acc", "metric: test_acc, select: last"), name="sel.yaml")
    assert last.warnings() == []  # `last` chooses on nothing
    with pytest.raises(UserError, match=r"init_from\.metric: got 'val_acc'; expected a metric its runs log"):
        parse_spec(SELECTING, {"base.data.val_fraction": 0.0, "stages[1].init_from.metric": "val_acc"})


def test_init_from_on_test_data_without_a_split_is_allowed_and_said_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = SELECTING.replace(", val_fraction: 0.1", "")
    plan = parse_spec(text, name="sel.yaml")
    assert {t.init_from["metric"] for t in plan.trials if t.stage == "fine"} == {"test_acc"}
    (warning,) = plan.warnings()
    assert "chosen on test data (no validation split): optimistic" in warning and "init_from.metric: val_acc" in warning
    path = tmp_path / "sel.yaml"
    path.write_text(text)
    code, out, err = run_cli(["validate", str(path)], capsys)
    assert code == 0 and out.startswith("ok ") and err == f"warning: {path}: {warning}\n"
    code, out, _ = run_cli(["plan", str(path)], capsys)
    assert code == 0 and out.count("chosen on test data (no validation split): optimistic") == 1


def test_stages_exclude_top_level_axes() -> None:
    text = (SWEEPS / "regularised.yaml").read_text() + "grid:\n  train.lr: [0.1]\n"
    with pytest.raises(UserError, match=r"^r\.yaml:\d+: grid: not allowed beside `stages`"):
        parse_spec(text, name="r.yaml")


def test_spec_without_source_still_gives_one_line_errors() -> None:
    spec = SweepSpec.model_validate({"name": "x", "grid": {"train.lrr": [0.1]}})
    with pytest.raises(UserError, match=r"^<spec x>: grid\.train\.lrr: unknown field train\.lrr \(did you mean lr\?\)"):
        expand(spec)


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


# --- hostile and oversized input ----------------------------------------------------------------------------------


def _bomb(levels: int = 9) -> str:
    """A "billion laughs": each level lists the one before ten times (10**levels strings in well under 1 KB)."""
    lines = ["name: bomb", "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join([*lines, f"base: {{train: {{l2: *a{levels - 1}}}}}"]) + "\n"


def test_billion_laughs_is_refused_in_seconds_by_validate_plan_and_launch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import fasweep.launch  # noqa: F401  (imported before the clock starts: it loads Ray)

    spec = tmp_path / "bomb.yaml"
    spec.write_text(_bomb())
    assert len(spec.read_bytes()) < 1024
    for command in ("validate", "plan", "launch"):
        start = time.perf_counter()
        code, out, err = run_cli([command, str(spec)], capsys)
        assert time.perf_counter() - start < 5, command
        assert (code, out) == (2, "")
        assert err == f"error: {spec}:6: a4: got 111,111 YAML values once aliases are expanded; " + (
            "expected at most 100,000 (MAX_YAML_NODES)\n"
        )


def test_recursive_alias_is_refused() -> None:
    with pytest.raises(UserError, match=r"^r\.yaml:2: description\[0\]: recursive YAML alias; expected a value"):
        parse_spec("name: r\ndescription: &d [*d]\n", name="r.yaml")


def test_huge_grid_is_counted_not_expanded() -> None:
    text = (BAD / "huge_grid.yaml").read_text()  # 7 axes × 10 values
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"^h\.yaml:4: grid: got 10,000,000 trials \(1 condition × 10,000,000 grid"):
        parse_spec(text, name="h.yaml")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - start < 5 and peak < 20e6


def test_trial_cap_counts_every_stage_and_blames_the_biggest_factor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks, "MAX_TRIALS", 6)
    assert len(load_spec(SWEEPS / "quickstart.yaml").trials) == 6
    with pytest.raises(UserError, match=r"^--set seeds: got 12 trials \(3 conditions × 1 grid cell × 1 sample × 4"):
        load_spec(SWEEPS / "quickstart.yaml", {"seeds": [0, 1, 2, 3]})
    expected = (
        r"^--set stages\[1\]\.seeds: got 27 trials \(stage regularised: 4 conditions × .*6 seeds\); expected at most 6"
    )
    with pytest.raises(UserError, match=expected):
        load_spec(SWEEPS / "regularised.yaml", {"stages[1].seeds": [0, 1, 2, 3, 4, 5]})


def test_spec_text_and_file_size_are_capped(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"name: big\n" + b"#" * reading.MAX_SPEC_BYTES)
    with pytest.raises(UserError, match=r"^spec: got '.*big\.yaml'; expected a YAML file of at most 1,048,576 bytes"):
        load_spec(big)
    with pytest.raises(UserError, match=r"^s: got 1,048,587 characters; expected at most 1,048,576"):
        parse_spec(big.read_text() + "#", name="s")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "name: d\ndescription: " + "[" * 2000 + "]" * 2000,
            r"^d: YAML nested too deeply to read; expected at most 32",
        ),
        ("name: d\nseeds: [2024-13-45]", r"^d: unreadable YAML value \(month must be in 1\.\.12\); expected plain"),
        ("name: d\nseeds: [" + "1" * 5000 + "]", r"^d: unreadable YAML value \(Exceeds the limit \(4300 digits\)"),
    ],
)
def test_unreadable_yaml_is_one_line(text: str, error: str) -> None:
    with pytest.raises(UserError, match=error):
        parse_spec(text, name="d")


@pytest.mark.parametrize(
    "text",
    [
        'name: "abc\\n"',
        f"name: {'a' * 101}",
        "name: a+b",
        "name: a b",
        'name: s\nstages: [{name: "s\\n"}]',
        'name: s\nconditions: {"x\\n": {}}',
        f"name: s\nconditions: {{{'c' * 101}: {{}}}}",
        'name: s\nexperiment: ""',
        "name: s\nexperiment: ' '",
        'name: s\nexperiment: "runs\\e[31m"',
        f"name: s\nexperiment: {'é' * 257}",
    ],
)
def test_names_are_full_matched_and_capped(text: str) -> None:
    with pytest.raises(UserError, match=r"^s\.yaml:\d: (name|stages\[0\]\.name|conditions\.\S+|experiment): got "):
        parse_spec(text + "\n", name="s.yaml")
    with pytest.raises(UserError) as info:
        parse_spec(text + "\n", name="s.yaml")
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_longest_names_pass() -> None:
    sets = {"name": "n" * 100, "experiment": "Feedback alignment: é " + "e" * 234, "conditions.DS0-" + "c" * 96: {}}
    plan = load_spec(SWEEPS / "lillicrap.yaml", sets)
    assert plan.spec.name == "n" * 100 and len(plan.spec.experiment) == 256


@pytest.mark.parametrize("seeds", [[-1], [2**32], [0, 2**64]])
def test_seeds_beyond_the_rngs_fail_in_validate(seeds: list[int]) -> None:
    with pytest.raises(UserError, match=r"^--set seeds: seeds\[\d\]: got -?\d+; expected a seed from 0 to 4294967295"):
        load_spec(SWEEPS / "quickstart.yaml", {"seeds": seeds})
    with pytest.raises(UserError, match=r"^--set stages\[1\]\.seeds: .*expected a seed from 0 to 4294967295"):
        load_spec(SWEEPS / "regularised.yaml", {"stages[1].seeds": seeds})
    assert load_spec(SWEEPS / "quickstart.yaml", {"seeds": [2**32 - 1]}).trials[0].config["train"]["seed"] == 2**32 - 1


@pytest.mark.parametrize(
    "path",
    [
        "base.train.lr",
        "base.train.weight_clip",
        "base.train.l2",
        "base.train.l2.conv",
        "base.feedback.init_scale",
        "base.feedback.decay",
        "resources.cpu",
        "resources.gpu",
        "reference.DS0.test_acc",
        "sample.train.lr",
    ],
)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_numbers_are_refused(path: str, value: float) -> None:
    sets = {path: {"uniform": [0.1, value]} if path.startswith("sample") else value}
    with pytest.raises(UserError, match=rf"^--set {re.escape(path)}: .*expected a finite number"):
        load_spec(SWEEPS / "quickstart.yaml", sets)


def test_set_values_are_read_as_safely_as_a_spec() -> None:
    levels = ["&l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    levels += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 6)]
    with pytest.raises(UserError, match=r"^--set grid\.train\.lr:1: \[4\]: got 111,111 YAML values once aliases"):
        parse_sets([f"grid.train.lr=[{', '.join(levels)}]"])
    with pytest.raises(UserError, match=r"^--set base:1: <top>: YAML tag !!python/name:os\.system is not allowed"):
        parse_sets(["base=!!python/name:os.system"])
    assert parse_sets(["seeds=[0, 1]", "description=", "x=null"]) == {"seeds": [0, 1], "description": "", "x": None}


# --- --set messages -----------------------------------------------------------------------------------------------


def test_set_of_a_trial_path_suggests_base_and_stage_overrides() -> None:
    with pytest.raises(UserError, match=r"^--set train\.epochs: .* \(did you mean base\.train\.epochs\?\)$"):
        load_spec(SWEEPS / "quickstart.yaml", {"train.epochs": 1})
    with pytest.raises(
        UserError, match=r"^--set stages\[1\]\.model\.dropout: .*stages\[1\]\.overrides\.model\.dropout"
    ):
        load_spec(SWEEPS / "regularised.yaml", {"stages[1].model.dropout": 0.1})


def test_set_of_a_new_key_blames_the_flag() -> None:
    with pytest.raises(UserError, match=r"^--set base\.trian\.epochs: unknown field \(did you mean train\?\)"):
        load_spec(SWEEPS / "quickstart.yaml", {"base.trian.epochs": 1})
    with pytest.raises(UserError, match=r"^--set seed: unknown field \(did you mean seeds\?\)"):
        load_spec(SWEEPS / "quickstart.yaml", {"seed": [1]})


def test_set_of_a_base_value_every_condition_overrides_is_refused() -> None:
    expected = r"^--set base\.model\.arch: got 'PG1'; expected a base value some trial uses, but every condition sets"
    with pytest.raises(UserError, match=expected + r" model\.arch \(DS0, DSR1, DSR2-U\)$"):
        load_spec(SWEEPS / "quickstart.yaml", {"base.model.arch": "PG1"})
    with pytest.raises(UserError, match=expected + r" model\.arch \(pg0/PG0, regularised/none, .* and 1 more\)$"):
        load_spec(SWEEPS / "regularised.yaml", {"base.model.arch": "PG1"})  # by conditions and stage overrides
    with pytest.raises(UserError, match=r"^--set base\.model\.batchnorm: got True; .* sets model\.batchnorm \(conc"):
        load_spec(SWEEPS / "sign_concordance.yaml", {"base.model.batchnorm": True})  # by a grid axis
    plan = load_spec(SWEEPS / "quickstart.yaml", {"base.model.activation": "tanh", "base.data.name": "digits"})
    assert {t.config["model"]["activation"] for t in plan.trials} == {"tanh"}


def test_set_through_a_yaml_alias_changes_only_its_own_place() -> None:
    text = "name: shared\nbase: {data: {name: digits}}\nconditions:\n  a: &c {model.arch: DS0}\n  b: *c\n"
    plan = parse_spec(text, {"conditions.a.model.arch": "DSR1"})
    assert {t.condition: t.overrides["model.arch"] for t in plan.trials} == {"a": "DSR1", "b": "DS0"}


def test_launch_help_shows_a_spec_path(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli(["launch", "--help"], capsys)
    assert code == 0 and "--set base.train.epochs=1" in out and " train.epochs" not in out
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0 and "--set train.epochs=1" in out and "base." not in out


# --- what differs on --resume ---------------------------------------------------------------------------------------


def test_plan_difference_names_the_changed_fields() -> None:
    earlier = dump_spec(load_spec(SWEEPS / "quickstart.yaml").spec)
    new = load_spec(SWEEPS / "quickstart.yaml", {"base.train.epochs": 8, "seeds": [0]})
    assert plan_difference(earlier, new) == "base.train.epochs: 3 -> 8; seeds: [0,1] -> [0]"
    wider = load_spec(SWEEPS / "quickstart.yaml", {"grid.train.lr": [0.1, 0.01], "conditions.DS0.model.arch": "PG0"})
    assert plan_difference(earlier, wider) == (
        "conditions.DS0.model.arch: DS0 -> PG0; grid.train.lr: (unset) -> [0.1,0.01]"
    )
    staged = dump_spec(load_spec(SWEEPS / "regularised.yaml").spec)
    later = load_spec(SWEEPS / "regularised.yaml", {"stages[1].seeds": [7], "stages[0].overrides.train.lr": 0.5})
    assert (
        plan_difference(staged, later) == "stages[0].overrides.train.lr: (unset) -> 0.5; stages[1].seeds: null -> [7]"
    )


def test_plan_difference_is_short_and_never_raises() -> None:
    earlier = dump_spec(load_spec(SWEEPS / "quickstart.yaml").spec)
    many = {f"base.train.{k}": v for k, v in {"epochs": 1, "lr": 0.5, "batch_size": 7, "momentum": 0.5}.items()}
    many |= {"base.model.dropout": 0.5, "base.model.batchnorm": True, "base.feedback.decay": 0.5, "seeds": [5]}
    text = plan_difference(earlier, load_spec(SWEEPS / "quickstart.yaml", many))
    assert text.count(" -> ") == 6 and text.endswith("; and 2 more")
    same = load_spec(SWEEPS / "quickstart.yaml")
    assert plan_difference(earlier, same).startswith("the same spec plans other trials")
    assert plan_difference("name: [", same).startswith("the earlier launch's spec.yaml is unreadable (spec.yaml:1")
    assert plan_difference(_bomb(), same).startswith("the earlier launch's spec.yaml is unreadable (spec.yaml:6: a4")


def test_packs_are_balanced_and_cut_to_fill_the_slots() -> None:
    text = "name: p\npack: 16\nbase: {data: {name: digits}}\nseeds: [%s]\n"
    plan = parse_spec(text % ", ".join(map(str, range(17))))
    assert [len(p) for p in plan.packs("main")] == [9, 8]  # not 16 + 1
    sixteen = parse_spec(text % ", ".join(map(str, range(16))))
    assert [len(p) for p in sixteen.packs("main")] == [16]
    assert [len(p) for p in sixteen.packs("main", slots=2)] == [8, 8]
    assert [len(p) for p in sixteen.packs("main", slots=3)] == [6, 5, 5]
    assert [[t.key for t in p] for p in sixteen.packs("main", slots=40)] == [[t.key] for t in sixteen.trials]
    assert sixteen.summary({"main": 2}).endswith(" in 2 packs (cut to fill 2 slots)")
    mixed = parse_spec(text % "0, 1, 2" + "conditions: {a: {}, b: {model.arch: DSR1}}\n")
    packs = [[t.key.removeprefix("main/") for t in p] for p in mixed.packs("main", slots=3)]
    assert packs == [["a/s0", "a/s1"], ["a/s2"], ["b/s0", "b/s1", "b/s2"]]  # the first of the largest is cut
    assert mixed.summary({"main": 3}).endswith(" in 3 packs (cut to fill 3 slots)")


def test_packs_group_compatible_trials_and_refuse_asha() -> None:
    text = (
        "name: p\npack: 3\nbase: {data: {name: digits}}\nseeds: [0, 1]\n"
        "conditions: {a: {train.lr: 0.01}, b: {train.lr: 0.02}, c: {model.arch: DSR1}}\n"
    )
    plan = parse_spec(text)
    packs = [[t.key for t in pack] for pack in plan.packs("main")]
    assert packs == [["main/a/s0", "main/a/s1"], ["main/b/s0", "main/b/s1"], ["main/c/s0", "main/c/s1"]]  # 4: 2+2
    assert plan.summary().endswith(" in 3 packs") and plan.summary({"main": 3}).endswith(" in 3 packs")
    assert [len(p) for p in parse_spec(text, {"pack": 1}).packs("main")] == [1] * 6
    for sets in ({"scheduler.asha.metric": "test_acc"}, {"pack": 1, "scheduler.asha.metric": "test_acc"}):
        staged = "name: p\nstages:\n  - {name: s, pack: 2}\n" if "pack" in sets else text
        with pytest.raises(UserError) as err:
            parse_spec(staged, sets)
        message = str(err.value)
        assert "\n" not in message and "pack" in message and "ASHA would stop a whole pack" in message, message
