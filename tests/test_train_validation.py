"""Validation metrics that say whether a policy learned from what it sees: the action loss over
demonstration samples only, and the L1 again with another sample's images."""

from types import SimpleNamespace

import torch
from torch import nn

from vla_peft.policy.heads import masked_mean
from vla_peft.train.loop import evaluate


def test_grounding_only_samples_do_not_dilute_the_action_loss():
    values, mask = torch.rand(4, 8, 4), torch.ones(4, 8, dtype=torch.bool)
    mask[0, 5:] = False  # an episode's end
    with_play = torch.cat([values, torch.rand(4, 8, 4)]), torch.cat([mask, torch.zeros(4, 8, dtype=torch.bool)])
    torch.testing.assert_close(masked_mean(*with_play), masked_mean(values, mask))
    torch.testing.assert_close(masked_mean(values[1:], mask[1:]), values[1:].mean())


class ReadsImages(nn.Module):
    """Predicts each sample's action as its image's mean brightness, or as a constant."""

    def __init__(self, uses_images: bool):
        super().__init__()
        self.uses_images = uses_images

    def forward(self, batch):
        guess = batch["images"].mean((1, 2, 3, 4, 5)) if self.uses_images else torch.full((len(batch["actions"]),), 0.5)
        l1 = (guess - batch["actions"]).abs().mean()
        return {"loss": l1, "l1": l1}


def test_validation_reports_the_l1_with_another_samples_images():
    brightness = torch.linspace(0, 1, 40)
    samples = [{"images": torch.full((1, 1, 3, 4, 4), float(b)), "actions": b} for b in brightness]
    cfg = SimpleNamespace(batch_size=8, grad_accum=1, num_workers=0, val_batches=5)
    seeing = evaluate(ReadsImages(True), samples, cfg)
    assert seeing["val_l1"] < 1e-6 < 0.1 < seeing["val_l1_images_shuffled"]
    blind = evaluate(ReadsImages(False), samples, cfg)
    assert abs(blind["val_l1"] - blind["val_l1_images_shuffled"]) < 1e-6
