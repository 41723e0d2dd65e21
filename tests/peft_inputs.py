"""Inputs for the PEFT tests: token ids with the image placeholders plus pixel values, so a
forward pass runs through the vision tower, the projector and the language model."""

import torch


def vlm_inputs(model, batch: int = 2, text_len: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(5, cfg.text_config.vocab_size, (batch, text_len), generator=g)
    image = torch.full((batch, cfg.image_seq_length), cfg.image_token_index)
    size = cfg.vision_config.image_size
    return {
        "input_ids": torch.cat([text[:, :2], image, text[:, 2:]], dim=1),
        "pixel_values": torch.randn(batch, 3, size, size, generator=g),
    }


def randomise_lora(model, seed: int = 0, std: float = 0.05) -> None:
    """Give every LoRA B a non-zero value so that the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
