"""vla_peft: parameter-efficient adaptation of vision-language models into robot policies."""

from vla_peft.models import TinyLlavaSpec, build_tiny_llava, load_vlm, save_tiny_llava
from vla_peft.peft import (
    LoraConfig,
    ParameterReport,
    inject,
    load_adapter,
    load_method_config,
    merge_lora,
    merged_copy,
    parameter_report,
    save_adapter,
    set_active_adapter,
    set_peft_enabled,
    unmerge_lora,
)

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "ParameterReport",
    "TinyLlavaSpec",
    "__version__",
    "build_tiny_llava",
    "inject",
    "load_adapter",
    "load_method_config",
    "load_vlm",
    "merge_lora",
    "merged_copy",
    "parameter_report",
    "save_adapter",
    "save_tiny_llava",
    "set_active_adapter",
    "set_peft_enabled",
    "unmerge_lora",
]
