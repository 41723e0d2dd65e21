"""Injection: target selection, freezing, the per-scope report, and config errors."""

from pathlib import Path

import pytest

from vla_peft import LoraConfig, inject, load_method_config, load_vlm, parameter_report
from vla_peft.peft.lora import lora_layers

CONFIGS = Path(__file__).parents[1] / "configs" / "peft"


@pytest.fixture
def model(tiny_llava_dir):
    return load_vlm(tiny_llava_dir)[0]


def test_pattern_that_matches_nothing_lists_nearest_names(model):
    config = LoraConfig(targets={"language": [r"layers\.\d+\.self_attn\.query"]})
    with pytest.raises(ValueError, match=r"matches no linear.*layers\.\d\.self_attn\.q_proj") as err:
        inject(model, config)
    assert "'language'" in str(err.value)
    assert not lora_layers(model)


def test_pattern_on_a_non_linear_is_a_no_match(model):
    with pytest.raises(ValueError, match="matches no linear"):
        inject(model, LoraConfig(targets={"language": [r"layers\.0\.input_layernorm"]}))


def test_everything_but_lora_is_frozen_and_report_adds_up(model):
    base = parameter_report(model)
    assert base.trainable == 0
    model.lm_head.weight.requires_grad_(True)  # inject must freeze whatever was trainable before
    report = inject(model, LoraConfig(r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert report.rows["other"] == (0, base.rows["other"][1])
    for scope in ("vision", "projector", "language"):
        trainable_here, total = report.rows[scope]
        assert trainable_here > 0 and total == base.rows[scope][1] + trainable_here
    table = str(report)
    assert table.splitlines()[0].split() == ["scope", "trainable", "total", "%"]
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["vision", "projector", "language", "other", "all"]


def test_adapter_name_clash_is_refused(model):
    inject(model, LoraConfig(r=2))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        inject(model, LoraConfig(r=2))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"method": "lora", "r": 0}, r"r must be > 0 \(got 0\): set r to a positive integer"),
        ({"method": "lora", "r": -3}, r"r must be > 0"),
        ({"method": "lora", "alpha": 0}, r"alpha must be > 0"),
        ({"method": "lora", "dropout": 1.5}, r"dropout must be in \[0, 1\)"),
        ({"method": "lora", "rank": 8}, r"unknown lora config key.*'rank': \['r'"),
        ({"method": "lora", "lora_alpha": 8}, r"unknown lora config key.*'lora_alpha': \['alpha'"),
        ({"method": "lora", "targets": {"text": ["q_proj"]}}, r"unknown scope 'text'; use one of"),
        ({"method": "lora", "targets": {"language": ["q_proj("]}}, r"not a valid regex"),
        ({"method": "dora"}, r"unknown PEFT method 'dora'; known methods: \['adapter', 'lora', 'prefix', 'prompt'"),
        ({"r": 8}, r"no 'method' key"),
    ],
)
def test_bad_configs_fail_clearly(data, message):
    with pytest.raises(ValueError, match=message):
        load_method_config(data)


def test_yaml_configs_load_with_overrides():
    lora = load_method_config(CONFIGS / "lora.yaml", {"r": 16})
    qlora = load_method_config(CONFIGS / "qlora.yaml")
    assert isinstance(lora, LoraConfig) and lora.r == 16 and not lora.load_in_4bit
    assert isinstance(qlora, LoraConfig) and qlora.load_in_4bit
    assert LoraConfig.from_dict(lora.to_dict()) == lora


def test_default_lora_reaches_both_towers_and_projector(model):
    rows = {line.split()[0]: line.split()[1:] for line in str(inject(model, LoraConfig())).splitlines() if line.strip()}
    for scope in ("vision", "projector", "language"):
        assert int(rows[scope][0].replace(",", "")) > 0, rows
    assert rows["other"][0] == "0"
