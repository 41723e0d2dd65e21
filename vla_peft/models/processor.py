"""The processor (tokenizer + image processor + chat template) saved beside a tiny base."""

from __future__ import annotations

from pathlib import Path

from transformers import LlavaProcessor, PretrainedConfig, PreTrainedTokenizerBase

try:  # transformers 5 without torchvision: the PIL image processor is the one that loads.
    from transformers import CLIPImageProcessorPil as _ImageProcessor
except ImportError:  # pragma: no cover - older 5.x releases
    from transformers import CLIPImageProcessor as _ImageProcessor

# LLaVA-1.5 style turns: "USER: <image>\n... ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def save_processor(path: str | Path, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> LlavaProcessor:
    """Write a LlavaProcessor matching ``config`` so ``AutoProcessor.from_pretrained`` loads it."""
    size = config.vision_config.image_size
    image_processor = _ImageProcessor(
        size={"height": size, "width": size},
        do_center_crop=False,
        crop_size={"height": size, "width": size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # the CLIP class token
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
    return processor
