"""vla_peft: parameter-efficient adaptation of vision-language models into robot policies."""

from vla_peft.models import TinyLlavaSpec, build_tiny_llava, load_vlm, save_tiny_llava

__version__ = "0.1.0"

__all__ = ["TinyLlavaSpec", "__version__", "build_tiny_llava", "load_vlm", "save_tiny_llava"]
