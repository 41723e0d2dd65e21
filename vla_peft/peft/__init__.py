"""PEFT modules and their injection into LLaVA-style VLMs. Knows nothing of robots."""

from vla_peft.peft.base import SCOPES, PeftModule, scope_modules
from vla_peft.peft.config import MethodConfig, load_method_config, register
from vla_peft.peft.inject import inject, set_active_adapter, set_peft_enabled
from vla_peft.peft.io import load_adapter, save_adapter
from vla_peft.peft.lora import LoraConfig, merge_lora, merged_copy, unmerge_lora
from vla_peft.peft.report import ParameterReport, parameter_report

__all__ = [
    "SCOPES",
    "LoraConfig",
    "MethodConfig",
    "ParameterReport",
    "PeftModule",
    "inject",
    "load_adapter",
    "load_method_config",
    "merge_lora",
    "merged_copy",
    "parameter_report",
    "register",
    "save_adapter",
    "scope_modules",
    "set_active_adapter",
    "set_peft_enabled",
    "unmerge_lora",
]
