"""Bad training configs: each is one line naming the key (or file) and the fix, before anything loads,
leaving no files; relative paths are found from any working directory."""

import re
from pathlib import Path

import pytest

from vla_peft.cli import main
from vla_peft.train import load_run_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"policy: {{base: vla_peft/pretrain/base}}\nmethod: configs/peft/lora.yaml\n"
                    f"data: {{paths: [demos.hdf5]}}\ntrain: {{output_dir: {tmp_path / 'out'}}}\n")
    return path


CASES = [
    ("policy: [\n", [], r"run\.yaml: not valid YAML \(.* at line 2, column 1\); fix the file's syntax"),
    ('"just a string"\n', [], r"run\.yaml: expected a training config with sections .* holds a str \('just a string'\)"),
    (None, ["data.pathz=x.hdf5"], r"data: unknown key 'pathz'; did you mean data\.paths\?"),
    (None, ["train.steps=abc"], r"train\.steps='abc': expected a whole number"),
    (None, ["train.steps=2.5"], r"train\.steps=2\.5: expected a whole number"),
    (None, ["train.seed=abc"], r"train\.seed='abc': expected a whole number"),
    (None, ["train.threads=-1"], r"train\.threads=-1: must be > 0"),
    (None, ["train.lr=abc"], r"train\.lr='abc': expected a number, e\.g\. train\.lr=3e-4"),
    (None, ["train.lr=-1e-3"], r"train\.lr=-0\.001: must be > 0"),
    (None, ["method.r=abc"], r"method\.r='abc': expected a whole number"),
    (None, ["policy.cameras=5"], r"policy\.cameras=5: expected a list of strings"),
    (None, ["data.augment=maybe"], r"data\.augment='maybe': expected true or false"),
    (None, ["train.lr=["], r"override 'train\.lr=\[': the value is not valid YAML"),
    (None, ["policy.base=no/such/dir"], r"policy\.base='no/such/dir': no such directory .* give the checkpoint"),
    ("policy: 5\n", [], r"policy: expected a mapping of keys to values, got int 5"),
]


@pytest.mark.parametrize("text, overrides, message", CASES)
def test_a_bad_config_is_one_line_naming_the_key_and_writes_nothing(config, text, overrides, message, capsys):
    if text is not None:
        config.write_text(text)
    assert main(["train", "--config", str(config), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(message, err), err
    assert not (config.parent / "out").exists()


def test_relative_paths_are_found_from_another_working_directory(config, tmp_path, monkeypatch):
    (tmp_path / "demos.hdf5").write_bytes(b"")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = load_run_config(config)
    assert run.policy.base == str(REPO / "vla_peft" / "pretrain" / "base")  # the shipped base, from the repository
    assert run.data["paths"] == [str(tmp_path / "demos.hdf5")]  # beside the config file
    assert run.method.method == "lora"  # configs/peft/lora.yaml, from the repository
    assert load_run_config(config, ["policy.base=org/model"]).policy.base == "org/model"  # a hub name is kept


def test_a_method_file_with_bad_yaml_names_the_file(config, tmp_path):
    bad = tmp_path / "bad_method.yaml"
    bad.write_text("method: lora\nr: [8\n")
    with pytest.raises(ValueError, match=r"bad_method\.yaml: not valid YAML"):
        load_run_config(config, [f"method={bad}"])
