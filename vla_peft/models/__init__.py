"""Loading LLaVA-style VLMs: any transformers checkpoint, NF4 via bitsandbytes, and a tiny CPU base."""

from vla_peft.models.image_norm import ImageNorm, load_image_norm, save_image_norm
from vla_peft.models.load import load_vlm, nf4_config
from vla_peft.models.tiny import TinyLlavaSpec, build_tiny_llava, save_tiny_llava

__all__ = [
    "ImageNorm",
    "TinyLlavaSpec",
    "build_tiny_llava",
    "load_image_norm",
    "load_vlm",
    "nf4_config",
    "save_image_norm",
    "save_tiny_llava",
]
