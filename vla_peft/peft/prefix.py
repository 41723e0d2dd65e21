"""Prefix tuning (Li & Liang 2021) and prompt tuning (Lester et al. 2021) of the language model.

Where they act. Both work at one place: the language model's own forward
(``model.model.language_model``), through a forward pre-hook that rewrites its keyword
arguments and, for prompt tuning, a forward hook that trims its outputs. Every route into the
language model passes there: ``LlavaForConditionalGeneration.forward``, ``generate``, and a
policy calling it with hand-built ``inputs_embeds``. HF peft instead wraps the top-level model and
feeds ``past_key_values`` into it, which LLaVA-style forwards and transformers 5's cache classes
break; nothing here depends on the top-level model.

Prefix tuning: m learned keys and values per layer are exactly a KV cache that already holds m
tokens. So on the first call of a sequence the pre-hook fills a ``DynamicCache`` (or the caller's
empty cache) with the prefix, extends a 2D attention mask by m ones on the left and gives the
tokens positions that ignore the prefix; transformers' mask code then sizes and offsets the
causal mask from the cache by itself. The prefix keys carry no rotary position (they are learned
as they are used, as in Li & Liang and HF peft). The cache records how many prefix entries it
holds, so every later decoding step extends the mask and positions the same way. Hooking each
attention layer instead would mean rebuilding the 4D mask of every attention backend by hand.

Prompt tuning: the pre-hook embeds ``input_ids`` when needed, prepends m soft tokens, extends the
mask by m ones and puts the soft tokens at positions 0..m-1 with the real tokens after them; the
forward hook removes the m soft positions from the outputs, so logits and hidden states line up
with the caller's tokens (labels, ``generate`` and action heads index them as without it).

Limits, each raising a clear error: prefix tuning cannot train under gradient checkpointing
(transformers drops the cache inside checkpointed layers), and neither method takes a 4D
attention mask (``generate`` builds one for a static cache: use the default dynamic cache).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from vla_peft.peft.base import PeftModule, scope_modules
from vla_peft.peft.config import MethodConfig, register

# Set on a cache object: how many prefix / soft-prompt entries it holds ahead of the real tokens.
PREFIX_HELD = "vla_peft_prefix_length"
PROMPT_HELD = "vla_peft_prompt_length"
PREFIX_INIT_STD = 0.02  # direct prefixes start small so the base's attention is barely diluted


def _positive_int(value, name: str, example: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer (got {value!r}): set {name} to e.g. {example}")


@register
@dataclass
class PrefixConfig(MethodConfig):
    """``length`` learned key/value entries in every layer of the language model. With
    ``reparameterize`` (Li & Liang) they come from ``length`` embeddings of width ``embed_dim``
    (None: the model's hidden size) through a tanh MLP of width ``reparam_hidden``; it trains
    more stably, and costs only training-time parameters."""

    method = "prefix"
    length: int = 16
    reparameterize: bool = False
    embed_dim: int | None = None
    reparam_hidden: int = 512

    def __post_init__(self) -> None:
        _positive_int(self.length, "length", 16)
        if not isinstance(self.reparameterize, bool):
            raise ValueError(f"reparameterize must be true or false (got {self.reparameterize!r})")
        if self.embed_dim is not None:
            _positive_int(self.embed_dim, "embed_dim", 256)
        _positive_int(self.reparam_hidden, "reparam_hidden", 512)


@register
@dataclass
class PromptConfig(MethodConfig):
    """``length`` soft tokens prepended to the language model's input embeddings, initialised
    from the embeddings of randomly drawn vocabulary tokens (``init: vocab``, Lester et al.'s
    better start) or from a normal with the embedding table's std (``init: random``); ``seed``
    makes the draw repeatable."""

    method = "prompt"
    length: int = 16
    init: str = "vocab"
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_int(self.length, "length", 16)
        if self.init not in ("vocab", "random"):
            raise ValueError(f"init must be 'vocab' or 'random' (got {self.init!r})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer (got {self.seed!r})")


class _LanguageModelCall:
    """The language model's forward arguments as one dict, whichever 5.x names it uses."""

    def __init__(self, lm: nn.Module) -> None:
        params = list(inspect.signature(lm.forward).parameters)
        self.positional = [p for p in params if p not in ("args", "kwargs")]
        # transformers 5.24 renamed ``past_key_values`` to ``cache``; earlier 5.x use the old name.
        self.cache_key = "cache" if "cache" in params else "past_key_values"

    def kwargs(self, args: tuple, kwargs: dict) -> dict:
        kwargs = {**dict(zip(self.positional, args)), **kwargs}
        for key in ("cache", "past_key_values"):
            if key != self.cache_key and kwargs.get(key) is not None:
                kwargs[self.cache_key] = kwargs.pop(key)
        return kwargs


def _check_mask(mask: torch.Tensor | None, method: str) -> None:
    if mask is not None and mask.dim() != 2:
        raise ValueError(
            f"{method} tuning needs a 2D attention mask (batch, length) or none, got {mask.dim()}D; "
            "generate builds a 4D mask for a static cache: use the default dynamic cache"
        )


def _is_fresh(cache) -> bool:
    return cache is None or cache.get_seq_length() == 0


def _input_shape(kwargs: dict) -> tuple[int, int]:
    source = kwargs.get("inputs_embeds")
    source = source if source is not None else kwargs.get("input_ids")
    if source is None:
        raise ValueError("the language model needs input_ids or inputs_embeds; neither was given")
    return source.shape[0], source.shape[1]


def _with_ones(mask: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """Mark ``count`` leading entries (prefix or soft tokens) as attended."""
    if mask is None:
        return None
    return torch.cat([mask.new_ones(mask.shape[0], count), mask], dim=-1)


class PrefixEncoder(PeftModule):
    """The learned per-layer keys and values, directly or through Li & Liang's MLP.

    Parameters: L·2·m·d_kv directly; with the MLP, m·e + (e·h + h) + (h·2·L·d_kv + 2·L·d_kv),
    where d_kv = key/value heads × head width.
    """

    def __init__(self, lm: nn.Module, config: PrefixConfig) -> None:
        super().__init__()
        text = lm.config
        self.length = config.length
        self.num_layers = text.num_hidden_layers
        self.kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.call = _LanguageModelCall(lm)
        kv_width = self.num_layers * 2 * self.kv_heads * self.head_dim
        if config.reparameterize:
            embed_dim = config.embed_dim or text.hidden_size
            self.embedding = nn.Parameter(torch.randn(config.length, embed_dim))
            self.mlp = nn.Sequential(
                nn.Linear(embed_dim, config.reparam_hidden), nn.Tanh(), nn.Linear(config.reparam_hidden, kv_width)
            )
        else:
            self.prefix = nn.Parameter(torch.randn(config.length, kv_width) * PREFIX_INIT_STD)

    def key_values(self) -> torch.Tensor:
        """Shape (layers, 2, kv heads, m, head width)."""
        flat = self.mlp(self.embedding) if hasattr(self, "mlp") else self.prefix
        return flat.view(self.length, self.num_layers, 2, self.kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)

    def before_forward(self, lm: nn.Module, args: tuple, kwargs: dict):
        kwargs = self.call.kwargs(args, kwargs)
        cache = kwargs.get(self.call.cache_key)
        if self.enabled and _is_fresh(cache):
            _check_mask(kwargs.get("attention_mask"), "prefix")  # before touching the caller's cache
            if lm.training and torch.is_grad_enabled() and any(
                getattr(m, "gradient_checkpointing", False) for m in lm.modules()
            ):
                raise ValueError(
                    "prefix tuning cannot train with gradient checkpointing (transformers drops the KV cache "
                    "that carries the prefix inside checkpointed layers): call "
                    "model.gradient_checkpointing_disable(), or use LoRA or adapters"
                )
            cache = cache if cache is not None else DynamicCache(config=lm.config)
            batch, _ = _input_shape(kwargs)
            embeds = kwargs.get("inputs_embeds")
            dtype = embeds.dtype if embeds is not None else lm.get_input_embeddings().weight.dtype
            kv = self.key_values().to(dtype)
            for layer in range(self.num_layers):
                keys, values = (kv[layer, i].unsqueeze(0).expand(batch, -1, -1, -1) for i in (0, 1))
                cache.update(keys, values, layer)
            setattr(cache, PREFIX_HELD, self.length)
            kwargs[self.call.cache_key] = cache
        held = getattr(cache, PREFIX_HELD, 0) if cache is not None else 0
        if held:
            _check_mask(kwargs.get("attention_mask"), "prefix")
            kwargs["attention_mask"] = _with_ones(kwargs.get("attention_mask"), held)
            if kwargs.get("position_ids") is None:
                # Left to itself the model would count the prefix as past tokens.
                _, length = _input_shape(kwargs)
                past = cache.get_seq_length() - held
                device = lm.get_input_embeddings().weight.device
                kwargs["position_ids"] = (torch.arange(length, device=device) + past).unsqueeze(0)
        return (), kwargs


class SoftPrompt(PeftModule):
    """m learned input embeddings (m·d parameters) put before the language model's input."""

    def __init__(self, lm: nn.Module, config: PromptConfig) -> None:
        super().__init__()
        table = lm.get_input_embeddings().weight.detach().float()
        generator = torch.Generator().manual_seed(config.seed)
        if config.init == "vocab":
            ids = torch.randint(0, table.shape[0], (config.length,), generator=generator)
            start = table[ids.to(table.device)].clone()
        else:
            start = torch.randn(config.length, table.shape[1], generator=generator).to(table.device) * table.std()
        self.tokens = nn.Parameter(start)
        self.length = config.length
        self.call = _LanguageModelCall(lm)
        self._added = 0  # soft positions prepended by the running call, trimmed by after_forward

    def before_forward(self, lm: nn.Module, args: tuple, kwargs: dict):
        kwargs = self.call.kwargs(args, kwargs)
        cache = kwargs.get(self.call.cache_key)
        self._added = 0
        if self.enabled and _is_fresh(cache):
            _check_mask(kwargs.get("attention_mask"), "prompt")
            _input_shape(kwargs)
            embeds = kwargs.pop("inputs_embeds", None)
            if embeds is None:
                embeds = lm.get_input_embeddings()(kwargs.pop("input_ids"))
            kwargs["input_ids"] = None
            soft = self.tokens.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
            kwargs["inputs_embeds"] = torch.cat([soft, embeds], dim=1)
            kwargs["attention_mask"] = _with_ones(kwargs.get("attention_mask"), self.length)
            positions = kwargs.get("position_ids")
            if positions is not None:
                first = torch.arange(self.length, device=positions.device, dtype=positions.dtype)
                first = first.expand(*positions.shape[:-1], self.length)
                kwargs["position_ids"] = torch.cat([first, positions + self.length], dim=-1)
            self._added = self.length
            return (), kwargs
        held = getattr(cache, PROMPT_HELD, 0) if cache is not None else 0
        if held:  # a later step of a sequence that started with the soft prompt
            _check_mask(kwargs.get("attention_mask"), "prompt")
            kwargs["attention_mask"] = _with_ones(kwargs.get("attention_mask"), held)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + held
        return (), kwargs

    def after_forward(self, lm: nn.Module, args: tuple, kwargs: dict, output):
        added, self._added = self._added, 0
        if not added:
            return output
        if isinstance(output, tuple):
            return (output[0][:, added:], *output[1:])
        output.last_hidden_state = output.last_hidden_state[:, added:]
        if output.get("hidden_states") is not None:
            output.hidden_states = tuple(h[:, added:] for h in output.hidden_states)
        if output.get("attentions") is not None:
            output.attentions = tuple(a[..., added:, :] for a in output.attentions)
        cache = output.get(self.call.cache_key)
        if cache is not None:  # so the caller's next step with this cache knows it holds the prompt
            setattr(cache, PROMPT_HELD, added)
        return output


def _attach(model: nn.Module, name: str, module: PeftModule) -> nn.Module:
    lm = scope_modules(model)["language"]
    if isinstance(getattr(lm, name, None), PeftModule):
        raise ValueError(
            f"the language model already has {name}: inject it once per model (load the base again to start over)"
        )
    device = lm.get_input_embeddings().weight.device
    lm.add_module(name, module.to(device))
    module.requires_grad_(True)
    return lm


def inject_prefix(model: nn.Module, config: PrefixConfig) -> list[PeftModule]:
    """Give every layer of the language model a trainable key/value prefix; return its module."""
    lm = scope_modules(model)["language"]
    encoder = PrefixEncoder(lm, config)
    _attach(model, "prefix_tuning", encoder)
    lm.register_forward_pre_hook(encoder.before_forward, with_kwargs=True)
    return [encoder]


def inject_prompt(model: nn.Module, config: PromptConfig) -> list[PeftModule]:
    """Prepend trainable soft tokens to the language model's input; return their module."""
    lm = scope_modules(model)["language"]
    prompt = SoftPrompt(lm, config)
    _attach(model, "prompt_tuning", prompt)
    lm.register_forward_pre_hook(prompt.before_forward, with_kwargs=True)
    lm.register_forward_hook(prompt.after_forward, with_kwargs=True, always_call=True)
    return [prompt]
