"""Pretraining the tiny CPU base VLM on captions and grounding questions rendered from our own tasks.

It joins `envs` (scenes, privileged state) and `vla_peft.models` (the tiny LLaVA); neither imports it.
"""

from vla_peft.pretrain.base import default_base_path

__all__ = ["default_base_path"]
