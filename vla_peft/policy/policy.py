"""VLAPolicy: a frozen LLaVA-style VLM + injected PEFT modules + a trainable action head.

One forward pass per action chunk. The language model reads, in order:
the chat-templated prompt with each camera's image features where its ``<image>``
token stands, one proprio token (the normalised state through a small MLP), and
learned action-query tokens whose final hidden states the head decodes.
Batches are left-padded with explicit position ids, so the queries sit at the same
place in every row and a padded batch gives each sample's unpadded result.

Training batches come from ``vla_peft.data.DemoDataset`` (images in [0, 1], state and
actions already normalised); ``predict_chunk`` takes raw environment observations and
applies the same steps itself (same crop, same normalisers), then un-normalises.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from vla_peft.data.augment import ImageAugment, to_float_chw
from vla_peft.data.stats import Normalizer
from vla_peft.policy.action_queue import ActionQueues
from vla_peft.policy.config import PolicyConfig
from vla_peft.policy.flow import FlowHead
from vla_peft.policy.heads import ContinuousHead, DiscreteHead
from vla_peft.policy.image import PixelNormalizer, check_size
from vla_peft.policy.observation import MAX_INSTRUCTION_CHARS, check_actions, check_observation
from vla_peft.policy.peft_link import freeze_vlm, inject_method

PROMPT_CACHE_SIZE = 4096  # tokenised prompts kept (a task has a handful of instructions)
AUX_RANGE = 3.0  # aux targets are clamped to [-3, 3] normalised (mean/std) units


class SkipInit(TorchFunctionMode):
    """Inside it, ``torch.nn.init``'s functions and the random fills they end in leave their tensor as
    it is: the layers built are left uninitialised, for weights that are loaded over them at once. A
    torch function mode, so it holds for this thread alone and patches nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in INIT_FUNCTIONS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


# Some of nn.init's functions (xavier_uniform_, used by attention layers) go straight to the fills.
INIT_FUNCTIONS = frozenset([*(getattr(nn.init, name) for name in nn.init.__all__ if name.endswith("_")),
                            torch.Tensor.uniform_, torch.Tensor.normal_])


class VLAPolicy(nn.Module):
    """The frozen VLM, its PEFT modules and the policy's own parts (see the module's docstring).
    ``own_state`` (a bundle's ``own_state_dict``) gives the own parts those weights, built without the
    random init they would replace, and leaves the VLM's trainable flags as they are (the loaders,
    ``AdapterBank`` and ``load_bundle``, freeze what they load): a bank builds one per bundle it loads.
    Its tensors become the policy's weights, not copied (pass tensors nobody else holds, as a file's
    are); without the aux head's weights no aux head is built (it only trains, and a bank only acts)."""

    def __init__(self, config: PolicyConfig, vlm: nn.Module, processor=None, method_config=None,
                 own_state: dict[str, torch.Tensor] | None = None):
        super().__init__()
        if config.state_dim is None or config.image_size is None:
            raise ValueError("policy config: state_dim and image_size must be set (training fills them from the dataset)")
        if config.aux_keys and not config.aux_dim:
            raise ValueError("policy config: aux_keys are set but aux_dim is not (training fills it from the dataset)")
        self.config, self.processor, self.method_config = config, processor, method_config
        self.vlm = vlm
        if own_state is None:  # a policy loaded from a bundle: its loader freezes the base itself
            freeze_vlm(vlm)
        self.peft_report = inject_method(vlm, method_config) if method_config is not None else None
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if self.tokenizer is None:
            raise ValueError("the base checkpoint has no tokenizer: save one beside it (AutoTokenizer.save_pretrained)")
        # text an instruction must not hold: the image token would add a camera slot to the prompt
        self.reserved_text = tuple(t for t in self.tokenizer.all_special_tokens if t)
        text_config = vlm.config.text_config
        hidden = text_config.hidden_size
        self.image_token_id = vlm.config.image_token_id
        self.model_image_size = vlm.config.vision_config.image_size

        init = own_state is None
        aux = bool(config.aux_keys) and (init or any(k.startswith("aux_head.") for k in own_state))
        with contextlib.nullcontext() if init else SkipInit():
            self._build_own_parts(config, vlm, hidden, init, aux)
        if own_state is not None:
            self.load_own_state_dict(own_state)
        self.normalizers: dict[str, Normalizer] | None = None
        self._eval_crop = ImageAugment(crop_scale=config.center_crop) if config.center_crop < 1 else None
        self.pixels = PixelNormalizer(config.cameras, self.model_image_size, processor,
                                      config.base if config.base and Path(config.base).is_dir() else None)
        self._prompt_ids: dict[tuple[str, int], list[int]] = {}
        self.reset()

    # ------------------------------------------------------------------ building
    def _build_own_parts(self, config: PolicyConfig, vlm: nn.Module, hidden: int, init: bool, aux: bool) -> None:
        """The head, the action queries, the proprio projector and (with ``aux``) the aux head; the
        queries drawn only with ``init``."""
        if config.head == "continuous":
            self.head = ContinuousHead(hidden, config.action_dim, config.chunk_size, config.head_width)
        elif config.head == "flow":
            self.head = FlowHead(hidden, config.action_dim, config.chunk_size, config.head_width, config.flow_layers,
                                 config.flow_steps, config.flow_seed)
        else:
            self.head = DiscreteHead(vlm.get_output_embeddings(), len(self.tokenizer), self.tokenizer.all_special_ids,
                                     config.action_dim, config.chunk_size, config.n_bins)
        if init:
            embed_std = float(vlm.get_input_embeddings().weight.float().std())
            self.queries = nn.Parameter(torch.randn(self.head.num_queries, hidden) * embed_std)
        else:
            self.queries = nn.Parameter(torch.empty(self.head.num_queries, hidden))
        self.proprio = (
            nn.Sequential(nn.Linear(config.state_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
            if config.state_dim > 0 else None
        )
        # Training-only: every action query also regresses the aux targets (where the named objects are).
        self.aux_head = (
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, config.head_width), nn.GELU(),
                          nn.Linear(config.head_width, config.aux_dim))
            if aux else None
        )

    @classmethod
    def from_config(cls, config: PolicyConfig, method_config=None, normalizers: dict[str, Normalizer] | None = None,
                    vlm=None, processor=None) -> VLAPolicy:
        """Load the base named in ``config`` (unless given), inject ``method_config``, attach the normalisers."""
        if getattr(method_config, "load_in_4bit", False):
            config.load_in_4bit = True  # QLoRA: the method asks for an NF4 base
        if vlm is None:
            from vla_peft.models import load_vlm

            vlm, processor = load_vlm(config.base, dtype=config.dtype, load_in_4bit=config.load_in_4bit)
        policy = cls(config, vlm, processor, method_config)
        policy.normalizers = normalizers
        return policy

    def own_modules(self) -> dict[str, nn.Module]:
        """The policy's parts outside the VLM (saved in the bundle beside the PEFT weights)."""
        parts = {"head": self.head}
        if self.proprio is not None:
            parts["proprio"] = self.proprio
        if self.aux_head is not None:
            parts["aux_head"] = self.aux_head
        return parts

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        state = {"queries": self.queries.detach()}
        for name, module in self.own_modules().items():
            state.update({f"{name}.{k}": v.detach() for k, v in module.state_dict().items()})
        return {k: v.contiguous().cpu() for k, v in state.items()}

    def load_own_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take ``state``'s tensors as the own parts' weights (assigned, not copied)."""
        parts = {name: {} for name in self.own_modules()}
        unexpected = []
        for key, value in state.items():
            name, _, rest = key.partition(".")
            if name in parts and rest:
                parts[name][rest] = value
            elif key != "queries":
                unexpected.append(key)
        queries = state.get("queries")
        mismatch = "policy weights do not match this policy config"
        if queries is None or queries.shape != self.queries.shape:
            shape = None if queries is None else tuple(queries.shape)
            raise ValueError(f"{mismatch}: queries {shape}, wanted {tuple(self.queries.shape)}")
        if unexpected:
            raise ValueError(f"{mismatch}: unexpected {sorted(unexpected)}")
        try:
            for name, module in self.own_modules().items():
                module.load_state_dict(parts[name], assign=True)
        except RuntimeError as err:  # a part's missing or unexpected keys, or a shape
            raise ValueError(f"{mismatch}: {err}") from None
        self.queries = nn.Parameter(queries, requires_grad=self.queries.requires_grad)

    @property
    def device(self) -> torch.device:
        return self.queries.device

    # ------------------------------------------------------------------ inputs
    def _prompt(self, instruction: str, num_image_tokens: int) -> list[int]:
        """Token ids of the chat-templated prompt, each camera's ``<image>`` expanded to its features."""
        key = (instruction, num_image_tokens)
        if key not in self._prompt_ids:
            text = self.config.prompt.format(instruction=instruction)
            images = [{"type": "image"} for _ in self.config.cameras]
            template_owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
            if getattr(template_owner, "chat_template", None):
                messages = [{"role": "user", "content": [*images, {"type": "text", "text": text}]}]
                text = template_owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            else:
                text = "<image>\n" * len(self.config.cameras) + text
            ids = self.tokenizer(text, add_special_tokens=True).input_ids
            bos = self.tokenizer.bos_token_id
            if bos is not None and ids[:1] != [bos]:  # LLaVA's (Llama's) tokenizer adds it; ours and some others do not
                ids = [bos, *ids]
            if ids.count(self.image_token_id) != len(self.config.cameras):
                raise ValueError(
                    f"the prompt has {ids.count(self.image_token_id)} image tokens for "
                    f"{len(self.config.cameras)} cameras: check the checkpoint's chat template"
                )
            expanded = []
            for i in ids:
                expanded.extend([i] * num_image_tokens if i == self.image_token_id else [i])
            if len(self._prompt_ids) >= PROMPT_CACHE_SIZE:  # a server's clients may send endless distinct texts
                self._prompt_ids.clear()
            self._prompt_ids[key] = expanded
        return self._prompt_ids[key]

    @property
    def eval_views(self) -> int:
        """Rows per observation at inference: the evaluation crops that are averaged (``eval_crop_grid`` squared)."""
        return self.config.eval_crop_grid ** 2

    def check_observation(self, obs: dict, max_instruction_chars: int = MAX_INSTRUCTION_CHARS) -> tuple[dict, bool]:
        """``obs`` batched and checked against this policy's inputs (``vla_peft.policy.observation``)."""
        return check_observation(obs, self.config, self.reserved_text, max_instruction_chars)

    def observation_inputs(self, obs: dict) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Raw observation (batched, or one) -> (images (V*B, C, 3, H, W) in [0, 1], normalised state
        (V*B, S), instructions), the form the training batches have, for V = ``eval_views`` crops of
        each observation, crop-major (``average_views`` folds them back)."""
        if self.normalizers is None:
            raise RuntimeError("the policy has no normalisation statistics: train it or load it from a bundle")
        grid = self.config.eval_crop_grid
        if grid > 1 and self._eval_crop is None:
            raise ValueError(f"policy.eval_crop_grid={grid} needs an evaluation crop (center_crop < 1, set when "
                             "the policy is trained with data.augment): set eval_crop_grid to 1")
        obs, _ = self.check_observation(obs)
        cameras = []
        for camera in self.config.cameras:
            images = to_float_chw(obs[f"{camera}_rgb"])
            cameras.append(self._eval_crop.eval_grid(images, grid) if self._eval_crop is not None else images[None])
        parts = [obs[key] for key in self.config.state_keys]
        batch = len(obs["instruction"])
        state = np.concatenate(parts, axis=-1) if parts else np.zeros((batch, 0), np.float32)
        state = self.normalizers["state"].normalize(torch.from_numpy(state))
        views = self.eval_views
        return torch.stack(cameras, dim=2).flatten(0, 1), state.repeat(views, 1), obs["instruction"] * views

    def average_views(self, outputs: torch.Tensor) -> torch.Tensor:
        """(V*B, ...) -> (B, ...): the mean over each observation's evaluation crops."""
        return outputs.view(self.eval_views, -1, *outputs.shape[1:]).mean(0)

    def embed(self, images: torch.Tensor, state: torch.Tensor, instructions: list[str]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs_embeds, attention_mask, position_ids) for the language model."""
        batch, num_cams = images.shape[:2]
        if num_cams != len(self.config.cameras):
            raise ValueError(f"got images of {num_cams} cameras but the policy reads {self.config.cameras}")
        check_size(images.shape[-2], images.shape[-1], ",".join(self.config.cameras), self.config.image_size)
        if state.shape[-1] != self.config.state_dim:
            raise ValueError(f"state has {state.shape[-1]} values but policy.state_dim is {self.config.state_dim}: "
                             f"set state_dim to {state.shape[-1]} (the total size of {self.config.state_keys})")
        lm = self.vlm.model.language_model
        dtype = lm.get_input_embeddings().weight.dtype
        pixels = self.pixels(images.to(self.device, torch.float32)).transpose(0, 1).flatten(0, 1)  # camera-major
        features = torch.stack(list(self.vlm.model.get_image_features(pixel_values=pixels.to(dtype)).pooler_output))
        num_tokens = features.shape[1]
        features = features.view(num_cams, batch, num_tokens, -1).transpose(0, 1).reshape(-1, features.shape[-1])

        prompts = [self._prompt(text, num_tokens) for text in instructions]
        width = max(map(len, prompts))
        ids = torch.full((batch, width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        embeds = lm.get_input_embeddings()(ids)
        image_slots = (ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(image_slots, features.to(embeds.dtype))

        extra = [self.queries.to(dtype).unsqueeze(0).expand(batch, -1, -1)]
        if self.proprio is not None:
            extra.insert(0, self.proprio(state.to(self.device, torch.float32)).to(dtype).unsqueeze(1))
        extra = torch.cat(extra, dim=1)
        embeds = torch.cat([embeds, extra], dim=1)
        mask = torch.cat([mask, torch.ones(batch, extra.shape[1], dtype=mask.dtype, device=mask.device)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return embeds, mask, positions

    def query_hidden(self, images: torch.Tensor, state: torch.Tensor, instructions: list[str]) -> torch.Tensor:
        """The action queries' final hidden states (B, num_queries, H), in one forward pass."""
        embeds, mask, positions = self.embed(images, state, instructions)
        hidden = self.vlm.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state
        return hidden[:, -self.head.num_queries:]

    def head_output(self, images: torch.Tensor, state: torch.Tensor, instructions: list[str]) -> torch.Tensor:
        """The head's raw output (normalised actions, bin logits, or the flow expert's conditioning)."""
        return self.head(self.query_hidden(images, state, instructions))

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Loss and metrics for a collated ``DemoDataset`` batch (the current frame of its history is used)."""
        actions = batch["actions"].to(self.device, torch.float32)
        if actions.shape[1:] != (self.config.chunk_size, self.config.action_dim):
            raise ValueError(
                f"the batch's action chunks are {tuple(actions.shape[1:])} but the policy expects "
                f"(chunk_size={self.config.chunk_size}, action_dim={self.config.action_dim}): "
                "make the dataset's chunk size and action dimension match the policy config"
            )
        hidden = self.query_hidden(batch["images"][:, :, -1], batch["state"][:, -1], list(batch["instruction"]))
        result = self.head.loss(self.head(hidden), actions, batch["action_mask"].to(self.device).bool())
        if self.aux_head is not None:
            # clamped: a cube the arm knocks moves far in a dimension whose scale is the floor (a resting
            # cube's height), and one such frame would outweigh a batch of table-plane errors
            aux = batch["aux"].to(self.device, torch.float32).clamp(-AUX_RANGE, AUX_RANGE)
            aux_mse = (self.aux_head(hidden.float()) - aux.unsqueeze(1)).pow(2).mean()
            result["loss"] = result["loss"] + self.config.aux_weight * aux_mse
            result["aux_mse"] = aux_mse.detach()
        return result

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def predict_chunk(self, obs: dict, binarize_gripper: bool | None = None) -> np.ndarray:
        """Raw actions (K, A) for one observation, or (B, K, A) for a batch (``instruction`` a list).
        A bad observation raises ``ObservationError`` naming the key; actions are always finite."""
        obs, single = self.check_observation(obs)
        images, state, instructions = self.observation_inputs(obs)
        was_training = self.training
        if was_training:  # train()/eval() walk every module (every resident adapter too): only when needed
            self.eval()
        try:
            normalised = self.average_views(self.head.decode(self.head_output(images, state, instructions)))
        finally:
            if was_training:
                self.train()
        actions = self.normalizers["actions"].unnormalize(normalised.float().cpu())
        grip = self.config.gripper_index
        if grip is not None and (self.config.binarize_gripper if binarize_gripper is None else binarize_gripper):
            actions[..., grip] = torch.where(actions[..., grip] >= 0, 1.0, -1.0)
        actions = check_actions(actions.numpy().astype(np.float32))
        return actions[0] if single else actions

    def reset(self) -> None:
        """Forget queued actions (call at every episode start)."""
        self._actions = ActionQueues(1, self.config)

    def select_action(self, obs: dict) -> np.ndarray:
        """The next action: execute ``execute_steps`` of each predicted chunk, then re-plan;
        with ``temporal_ensemble`` > 0, re-plan every step and average every chunk's
        prediction for this step with weights exp(-m * age_rank) (ACT), oldest first."""
        if self._actions.needs_chunk(0):
            self._actions.push(0, self.predict_chunk(obs, binarize_gripper=self._actions.binarize_chunks))
        return self._actions.pop(0)
