"""Mixed batches: one language-model forward in which each sample uses its own task bundle, for
serving several robots or tasks from one process (inference only, unmerged bank).

Each task's rows are embedded by that task's policy (its LoRA in the vision tower and projector,
its proprio projector, action queries and state statistics; one small vision pass per task
present), left-padded to a common width, and run through the language model once with the base
output of every LoRA layer corrected row by row by that row's adapter. Each task's head then
reads its own rows.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from vla_peft.policy.observation import check_actions

SHARED_FIELDS = ("cameras", "image_size", "state_keys", "action_dim", "chunk_size")


@contextlib.contextmanager
def per_row_lora(layers, rows: dict[str, torch.Tensor]):
    """While active, every LoRA layer adds adapter ``name``'s update to the rows ``rows[name]``
    (the layers' shared active adapter must be None, so they add nothing themselves)."""

    def hook(module, args, output):
        x = args[0]
        for name, index in rows.items():
            adapter = module.adapters._modules.get(name)
            if adapter is not None and adapter.enabled:
                output.index_add_(0, index, adapter(x.index_select(0, index).float()).to(output.dtype))
        return output

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def predict_mixed(bank, obs: dict, names: list[str], binarize_gripper: bool | None = None) -> np.ndarray:
    """Raw action chunks (B, K, A) for a batched observation whose row i belongs to task ``names[i]``."""
    if bank.mode != "unmerged":
        raise ValueError("mixed batches need an unmerged bank (merged mode holds one task in the base weights)")
    batch = len(obs["instruction"])
    if len(names) != batch:
        raise ValueError(f"got {len(names)} task names for a batch of {batch} observations; give one per row")
    unknown = sorted(set(names) - set(bank.policies))
    if unknown:
        raise KeyError(f"no bundles named {unknown} in this bank; registered: {bank.names}")
    groups = {name: [i for i, n in enumerate(names) if n == name] for name in dict.fromkeys(names)}
    policies = {name: bank.policies[name] for name in groups}
    first = next(iter(policies.values())).config
    for name, policy in policies.items():
        for field in SHARED_FIELDS:
            if getattr(policy.config, field) != getattr(first, field):
                raise ValueError(
                    f"bundle {name!r} has {field}={getattr(policy.config, field)!r} but {names[0]!r} has "
                    f"{getattr(first, field)!r}: a mixed batch needs bundles with the same inputs and outputs"
                )

    obs, _ = policies[names[0]].check_observation(obs)  # the shared inputs: every row checked before any forward
    subs = {name: {k: ([v[i] for i in rows] if k == "instruction" else v[rows]) for k, v in obs.items()}
            for name, rows in groups.items()}
    for name, sub in subs.items():  # each task's own reserved tokens and state size
        policies[name].check_observation(sub)

    active = bank.active
    parts, blocks, start = {}, {}, 0
    try:
        for name in groups:  # each task's own embedding, with its LoRA in the vision tower
            bank._set_lora(name)
            policy = policies[name]
            parts[name] = policy.embed(*policy.observation_inputs(subs[name]))  # eval_views rows per observation
            own = parts[name][0]
            blocks[name] = torch.arange(start, start + len(own), device=own.device)  # its rows in the LM batch
            start += len(own)
        width = max(embeds.shape[1] for embeds, _, _ in parts.values())
        first_embeds = next(iter(parts.values()))[0]
        embeds = first_embeds.new_zeros(start, width, first_embeds.shape[-1])
        mask = torch.zeros(start, width, dtype=torch.long, device=embeds.device)
        for name, block in blocks.items():  # left padding keeps every row's tokens where its queries expect them
            e, m, _ = parts[name]
            embeds[block, width - e.shape[1]:] = e
            mask[block, width - m.shape[1]:] = m
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        bank._set_lora(None)
        with per_row_lora(bank._layers, blocks):
            hidden = bank.vlm.model.language_model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
            ).last_hidden_state
    finally:
        bank._set_lora(active)

    out = np.zeros((batch, first.chunk_size, first.action_dim), np.float32)
    for name, rows in groups.items():
        policy = policies[name]
        normalised = policy.average_views(policy.head.decode(policy.head(hidden[blocks[name], -policy.head.num_queries:])))
        actions = policy.normalizers["actions"].unnormalize(normalised.float().cpu())
        grip = policy.config.gripper_index
        binarize = policy.config.binarize_gripper if binarize_gripper is None else binarize_gripper
        if grip is not None and binarize:
            actions[..., grip] = torch.where(actions[..., grip] >= 0, 1.0, -1.0)
        out[rows] = actions.numpy()
    return check_actions(out)
