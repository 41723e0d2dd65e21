"""vla_peft: parameter-efficient adaptation of vision-language models into robot policies.

The public names below load on first use, so `import vla_peft.data` (in a collector's
worker process, say) does not pay for importing transformers.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "TinyLlavaSpec": "vla_peft.models",
    "build_tiny_llava": "vla_peft.models",
    "load_vlm": "vla_peft.models",
    "save_tiny_llava": "vla_peft.models",
    "AdapterConfig": "vla_peft.peft.adapter",
    "LoraConfig": "vla_peft.peft",
    "PrefixConfig": "vla_peft.peft.prefix",
    "PromptConfig": "vla_peft.peft.prefix",
    "ParameterReport": "vla_peft.peft",
    "inject": "vla_peft.peft",
    "load_adapter": "vla_peft.peft",
    "load_method_config": "vla_peft.peft",
    "merge_lora": "vla_peft.peft",
    "merged_copy": "vla_peft.peft",
    "parameter_report": "vla_peft.peft",
    "save_adapter": "vla_peft.peft",
    "set_active_adapter": "vla_peft.peft",
    "set_peft_enabled": "vla_peft.peft",
    "unmerge_lora": "vla_peft.peft",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'vla_peft' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name]), name)
