"""The `vla-peft` command line: every command documents every option, mistyped keys get suggestions."""

from __future__ import annotations

import argparse
import json

import pytest

from vla_peft.cli import build_parser, main

COMMANDS = ["collect", "import-lerobot", "train", "eval", "demo", "bench", "pretrain-base", "serve"]


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_is_there():
    assert sorted(subparsers()) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_runs_and_states_every_default(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: vla-peft " + command)
    for action in subparsers()[command]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.dest}: no help"
        if action.option_strings and not action.required:  # positionals and required options have no default
            assert "default" in action.help, f"{command} {action.option_strings[0]}: help does not state its default"


def test_mistyped_train_key_names_the_nearest(capsys):
    assert main(["train", "--config", "configs/train/reach_lora.yaml", "train.stpes=5"]) == 2
    err = capsys.readouterr().err
    assert "'stpes'" in err and "steps" in err


def test_mistyped_method_key_names_the_nearest(capsys):
    assert main(["train", "--config", "configs/train/reach_lora.yaml", "method.rr=4"]) == 2
    err = capsys.readouterr().err
    assert "'rr'" in err and "'r'" in err


@pytest.mark.parametrize("override, wrong, right", [
    ("collect.episdes=3", "episdes", "episodes"),
    ("eval.episdoes=3", "episdoes", "episodes"),
    ("train.bach_size=4", "bach_size", "batch_size"),
    ("data.val_fractoin=0", "val_fractoin", "val_fraction"),
    ("trian.steps=4", "trian", "train"),
])
def test_mistyped_demo_override_names_the_nearest_before_any_work(override, wrong, right, tmp_path, capsys,
                                                                  monkeypatch):
    import vla_peft.pretrain.base

    def no_build(*_, **__):
        raise AssertionError("the base was looked up (and maybe built) before the settings were checked")

    monkeypatch.setattr(vla_peft.pretrain.base, "default_base_path", no_build)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), override]) == 2
    err = capsys.readouterr().err
    assert repr(wrong) in err and right in err
    assert not out.exists()  # refused before collecting anything


def test_demo_unknown_task_lists_the_known_ones(tmp_path, capsys):
    assert main(["demo", "--tasks", "Reach,Fly", "--base", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'Fly'" in err and "reach" in err


def test_task_configs_open_with_the_command_that_uses_them():
    from vla_peft.demo import TASK_CONFIGS

    paths = sorted(TASK_CONFIGS.parent.glob("*/*.yaml"))
    assert {p.parent.name for p in paths} == {"peft", "train", "tasks"}
    for path in paths:
        lines = path.read_text().splitlines()
        opening = lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))]
        assert opening and any("vla-peft " in line for line in opening), f"{path} does not open with its command"


def test_bench_lists_scripts_and_saves_what_one_prints(tmp_path, capsys, monkeypatch):
    import vla_peft.bench as bench

    assert main(["bench"]) == 0
    assert "swap" in capsys.readouterr().out
    (tmp_path / "hello.py").write_text('"""Say hello."""\nimport sys\nprint("table row", sys.argv[1:])\n')
    monkeypatch.setattr(bench, "BENCH_DIR", tmp_path)
    out = tmp_path / "hello.json"
    assert main(["bench", "--out", str(out), "hello", "--flag", "3"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["output"] == "table row ['--flag', '3']\n" and saved["output"] in printed
    assert saved["command"] == "vla-peft bench hello --flag 3" and saved["returncode"] == 0
    assert main(["bench", "helo"]) == 2
    assert "'hello'" in capsys.readouterr().err


def test_documented_benchmark_tables_are_what_vla_peft_bench_printed():
    """Each ``$ vla-peft bench <name>`` block in docs/benchmarks.md is the saved output of that run, verbatim."""
    import re

    from vla_peft.bench import BENCH_DIR, ROOT

    page = (ROOT / "docs" / "benchmarks.md").read_text()
    blocks = re.findall(r"```\n\$ (vla-peft bench (\w+)[^\n]*)\n(.*?)\n```", page, flags=re.S)
    assert len(blocks) >= 6, "the benchmark tables are missing from docs/benchmarks.md"
    for command, name, printed in blocks:
        saved = json.loads((BENCH_DIR / "results" / f"{name}.json").read_text())
        assert saved["command"] == command and saved["returncode"] == 0
        assert saved["output"].strip("\n") == printed, f"docs/benchmarks.md table of {name} differs from bench/results/{name}.json"
