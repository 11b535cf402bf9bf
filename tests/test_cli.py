"""The command line as typer/click users expect it: -h and --help, --version, bare `fasweep` prints the help,
click-style value hints with the choices listed, and one error convention for every mistake (one `error:` line on
stderr, exit code 2, what exists named)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from test_spec import run_cli

from fasweep.cli import app

FASWEEP = str(Path(sys.executable).parent / "fasweep")  # the installed console script
COMMANDS = ["train", "models", "validate", "plan", "launch", "status", "ui", "report"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return run_cli(list(args), capsys)


def test_bare_fasweep_prints_the_help_and_exits_0() -> None:
    bare = subprocess.run([FASWEEP], capture_output=True, text=True, timeout=60)
    short = subprocess.run([FASWEEP, "-h"], capture_output=True, text=True, timeout=60)
    assert (bare.returncode, short.returncode) == (0, 0)
    assert bare.stdout == short.stdout and "Usage: fasweep [OPTIONS] COMMAND [ARGS]..." in bare.stdout
    assert all(command in bare.stdout for command in COMMANDS) and "--version" in bare.stdout


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version") == (0, f"fasweep {version('fasweep')}\n", "")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_has_clean_value_hints(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, command, "-h")
    assert code == 0 and out == run(capsys, command, "--help")[1]
    assert out.split("\n")[1].strip().startswith(f"Usage: fasweep {command} [OPTIONS]")
    for typer_hint in ("<bool>", "<list[", "<str>", "<path>", "<int>", "{"):
        assert typer_hint not in out, (command, typer_hint)
    assert "-h" in out and "--help" in out


def test_choices_are_listed_and_value_hints_named(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # no wrapped columns
    report = run(capsys, "report", "-h")[1]
    for hint in ("[md|csv|html|json]", "[final|best]", "[none|seed]", "[t|bootstrap]", "PATH=VALUE", "URI", "AXIS"):
        assert hint in report, hint
    assert "Usage: fasweep report [OPTIONS] SWEEP|SPEC" in report
    train = run(capsys, "train", "-h")[1]
    assert re.search(r"--feedback +RULE", train) and "bp, random, random_updated, sign_concordant, dfa" in train
    assert "Usage: fasweep validate [OPTIONS] SPEC..." in run(capsys, "validate", "-h")[1]
    assert "Usage: fasweep status [OPTIONS] [SWEEP]" in run(capsys, "status", "-h")[1]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["report", "x", "--at", "worst"], "error: --at: got 'worst'; expected final or best"),
        (["report", "x", "--format", "pdf"], "error: --format: got 'pdf'; expected md, csv, html or json"),
        (["report", "x", "--ci", "normal"], "error: --ci: got 'normal'; expected t or bootstrap"),
        (
            ["train", "--dataset", "fashion-mnist"],
            "error: data.name: got 'fashion-mnist'; expected one of cifar10, cifar100, mnist, fashion_mnist, "
            "imagefolder, digits, linear, teacher, or an import path module:attribute (did you mean fashion_mnist?)",
        ),
        (["train", "--epochs", "0"], "error: --epochs: got '0'; expected greater than or equal to 1"),
        (["validate"], "error: missing argument 'SPEC...' (fasweep validate -h)"),
        (["report", "x", "--formt", "md"], "error: no such option: --formt"),
        (["nosuch"], f"error: no such command 'nosuch'; expected one of {', '.join(COMMANDS)} (fasweep -h)"),
    ],
)
def test_usage_errors_are_one_error_line_with_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], line: str
) -> None:
    code, out, err = run(capsys, *args)
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1 and err.startswith(line), err


def test_the_console_script_prints_usage_errors_the_same_way() -> None:
    done = subprocess.run([FASWEEP, "report", "x", "--at", "worst"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", "error: --at: got 'worst'; expected final or best\n")


def test_every_command_is_registered_with_the_click_style_command() -> None:
    assert [c.callback.__name__ for c in app.registered_commands] == COMMANDS
    assert all(c.cls.__name__ == "Command" for c in app.registered_commands)


def test_the_cli_sets_torch_env_before_torch_loads_and_keeps_the_users_value() -> None:
    """fasweep.torch_env's variables are read by torch once per process: the CLI sets them before a command can
    load torch (so a local Ray's workers, started from it, inherit them), and never over what the user set."""
    probe = (
        "import os, sys\nfrom fasweep.cli import main\nloaded = 'torch' in sys.modules\n"
        "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(loaded, os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.splitlines()[-1] == "False 1", out.stdout + out.stderr
    env["THP_MEM_ALLOC_ENABLE"] = "0"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.splitlines()[-1] == "False 0", out.stdout + out.stderr
