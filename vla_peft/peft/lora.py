"""LoRA (Hu et al. 2021): a low-rank update B·A beside a frozen linear, over full-precision
or 4-bit NF4 (QLoRA) bases."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vla_peft.peft.base import PeftModule, PeftWrapper, base_modules, find_targets, set_plain
from vla_peft.peft.config import MethodConfig, check_targets, register


def default_lora_targets() -> dict[str, list[str]]:
    """Attention projections of both towers and both projector linears."""
    return {
        "vision": [r"encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj"],
        "projector": [r"linear_[12]"],
        "language": [r"layers\.\d+\.self_attn\.(q|k|v|o)_proj"],
    }


@register
@dataclass
class LoraConfig(MethodConfig):
    """``targets`` maps a scope to regex patterns matched in full against module names relative
    to the scope root; non-linear modules a pattern matches are skipped, so ``[".*"]`` means
    every linear of the scope. ``load_in_4bit`` marks QLoRA: the base must be loaded in NF4."""

    method = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    targets: dict[str, list[str]] = field(default_factory=default_lora_targets)
    load_in_4bit: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be > 0 (got {self.r!r}): set r to a positive integer such as 8")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"alpha must be > 0 (got {self.alpha!r}): set alpha to e.g. 2*r")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1) (got {self.dropout!r})")
        self.alpha = float(self.alpha)
        self.targets = check_targets(self.targets)

    @property
    def scaling(self) -> float:
        """alpha/r, or alpha/sqrt(r) with rsLoRA (keeps the update's scale stable as r grows)."""
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)


class ActiveAdapter:
    """Which named LoRA adapter a model uses. One instance is shared by every LoRA layer of a
    model, so switching adapters (per-task hot swap) is a single attribute assignment."""

    __slots__ = ("name",)

    def __init__(self, name: str | None = None) -> None:
        self.name = name


class LoraWeight(nn.Module):
    """A bare (out, in) weight, named like ``nn.Linear``'s so that keys read ``lora_A.weight`` as in
    HF peft. Not an ``nn.Linear``: that one initialises its weight in its constructor, and adding a
    bundle to a bank builds dozens of these."""

    def __init__(self, weight: torch.Tensor, requires_grad: bool = True, training: bool = True) -> None:
        super().__init__()
        # Straight into the parameter table: register_parameter's checks cost more than the rest of
        # this module's construction, and the name is fixed.
        self._parameters["weight"] = nn.Parameter(weight, requires_grad=requires_grad)
        set_plain(self, training=training)


MASK_STEPS = 1 << 16  # dropout probabilities are drawn in steps of 1/65536


def keep_mask(shape: torch.Size, p: float, device=None) -> tuple[torch.Tensor, float]:
    """A boolean mask keeping each element with probability 1 - p, and that probability, for LoRA's
    dropout. torch's ``bernoulli_`` (inside ``F.dropout``) makes one draw per element; here each
    64-bit random word is cut into four 16-bit draws, about 2x faster for the whole dropout, with p
    rounded to the nearest 1/65536 (0.05 becomes 0.0500031) and the returned share exact for it."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    dropped = round(p * MASK_STEPS)
    keep = words.view(torch.int16)[:n].view(shape) >= dropped - MASK_STEPS // 2
    return keep, 1.0 - dropped / MASK_STEPS


class LoraAdapter(PeftModule):
    """One named low-rank update: x -> B(A(dropout(x))) * scaling, in float32, made of the given
    (r, in) and (out, r) weights (``initial`` draws a fresh pair); ``requires_grad=False`` builds it
    frozen, for a caller that only runs it (no module walk to freeze it afterwards), and ``training``
    sets its mode, as ``train()`` would."""

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dropout: float,
                 requires_grad: bool = True, training: bool = True) -> None:
        super().__init__()
        self._modules["lora_A"] = LoraWeight(lora_A, requires_grad, training)  # as LoraWeight's parameter: the names are fixed
        self._modules["lora_B"] = LoraWeight(lora_B, requires_grad, training)
        # dropout: a probability, applied by keep_mask (no module call per forward)
        set_plain(self, dropout=dropout, scaling=scaling, training=training)

    @classmethod
    def initial(cls, d_in: int, d_out: int, r: int, scaling: float, dropout: float, device=None,
                requires_grad: bool = True, training: bool = True) -> LoraAdapter:
        """A as nn.Linear's own init (Kaiming-uniform, a=sqrt(5)), B zero: B·A = 0 at init."""
        lora_A = torch.empty(r, d_in, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        return cls(lora_A, torch.zeros(d_out, r, device=device, dtype=torch.float32), scaling, dropout, requires_grad,
                   training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, scaling = self._dropped(x)
        # Scaling the (tokens, r) intermediate rather than the (tokens, d_out) output makes the
        # elementwise pass d_out/r times smaller, forward and backward, and saves nothing extra.
        return F.linear(F.linear(x, self.lora_A.weight) * scaling, self.lora_B.weight)

    def _dropped(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The input with dropout applied and the scaling that goes with it: the kept inputs' 1/(1-p)
        rides on the scaling (one multiply of the small intermediate instead of one of the input)."""
        if not (self.dropout and self.training):
            return x, self.scaling
        keep, kept_share = keep_mask(x.shape, self.dropout, x.device)
        return x * keep, self.scaling / kept_share

    def add_to(self, out: torch.Tensor, x: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """``out + forward(x)`` for 2D (tokens, features) ``out`` and ``x``, in two ops instead of four:
        the scaling, the second matmul and the sum are one ``addmm`` (same maths; float rounding may
        differ in the last bit). ``in_place`` writes the sum into ``out``, for an ``out`` the caller
        just made (autograd allows it: the matmul that made ``out`` does not keep it for backward)."""
        x, scaling = self._dropped(x)
        # The weights straight from the module tables: at batch 1, nn.Module.__getattr__ (two per
        # weight) costs about what the matmuls do.
        lora_A, lora_B = self._modules["lora_A"]._parameters["weight"], self._modules["lora_B"]._parameters["weight"]
        h = F.linear(x, lora_A)
        if in_place:
            return out.addmm_(h, lora_B.t(), alpha=scaling)
        return torch.addmm(out, h, lora_B.t(), alpha=scaling)

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense (d_out, d_in) matrix."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear, told by its weight's class so that bitsandbytes (seconds to
    import) is loaded only when a 4-bit model exists."""
    return type(getattr(module, "weight", None)).__name__ == "Params4bit"


def dense_weight(linear: nn.Linear) -> torch.Tensor:
    """A linear's weight in full precision (dequantised from NF4/FP4 if needed; a 4-bit weight that
    bitsandbytes repacked for its CPU kernel is put back in its plain layout first)."""
    if is_4bit(linear):
        import bitsandbytes as bnb

        w = linear.weight
        if getattr(w.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacks NF4 weights for its CPU kernel at the first forward (on CPUs it has a
            # kernel for); dequantize_4bit reads only the plain layout, so restore it first, as
            # bitsandbytes does itself before saving (the next forward packs again).
            w.data, w.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    return linear.weight.data


NO_4BIT_MERGE = (
    "cannot merge LoRA into a 4-bit base: the merged weight would be rounded back to NF4. "
    "Use merged_copy(model) for a dequantised, merged full-precision copy instead"
)


class LoraLinear(PeftWrapper):
    """A frozen linear (``nn.Linear`` or bitsandbytes ``Linear4bit``) plus named LoRA adapters;
    the ``active`` holder, shared across the model, picks which one runs."""

    def __init__(self, base_layer: nn.Linear, active: ActiveAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active = active
        self.merged_adapter: str | None = None
        self.train(base_layer.training)  # a wrapper put into an eval-mode model stays in eval

    @property
    def weight(self) -> torch.Tensor:  # code that inspects ``proj.weight`` keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def add_adapter(self, name: str, config: LoraConfig,
                    weights: tuple[torch.Tensor, torch.Tensor] | None = None, trainable: bool = True) -> LoraAdapter:
        """Add adapter ``name``, freshly initialised, or made of ``weights`` (A, B) as a file holds
        them (taken as they are, converted only if not float32 on the base's device: pass tensors
        nobody else holds, as ``load_adapter``'s freshly read ones; nothing is drawn that they would
        replace), frozen unless ``trainable``."""
        if name in self.adapters:
            raise ValueError(f"this layer already has a LoRA adapter named {name!r}; choose another adapter_name")
        base = self.base_layer
        # In this wrapper's mode: dropout off in an eval-mode model.
        if weights is None:
            adapter = LoraAdapter.initial(base.in_features, base.out_features, config.r, config.scaling,
                                          config.dropout, base.weight.device, trainable, self.training)
        else:
            device = base.weight.device
            lora_A, lora_B = (w.to(device, torch.float32) for w in weights)
            adapter = LoraAdapter(lora_A, lora_B, config.scaling, config.dropout, trainable, self.training)
        self.adapters[name] = adapter
        return adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Called once per layer per forward, so it does no more Python, nor more torch ops, than it
        # must: the adapter is applied by a plain method (no module __call__ and its hook checks), on
        # the tokens flattened once to 2D (so no matmul reshapes on its own), its second matmul, the
        # scaling and the sum in one addmm written into the base's fresh output.
        name = self.active.name
        if self.merged_adapter is not None:
            if name != self.merged_adapter or not self.adapters[name].enabled:
                raise RuntimeError(
                    f"LoRA adapter {self.merged_adapter!r} is merged into the base weights; "
                    "unmerge it before switching or disabling adapters"
                )
            return self._base_forward(x)
        modules = self._modules  # the tables directly, as in LoraAdapter.add_to
        adapter = modules["adapters"]._modules.get(name) if name is not None else None
        if adapter is None or not adapter.enabled:
            return self._base_forward(x)
        base = modules["base_layer"]
        if x.dtype == torch.float32 and self._plain_base(base):
            weight, bias = base._parameters["weight"], base._parameters["bias"]
            if weight.dtype == torch.float32:
                flat = x.reshape(-1, x.shape[-1])
                out = adapter.add_to(F.linear(flat, weight, bias), flat, in_place=True)
                return out.view(*x.shape[:-1], out.shape[-1])
        out = base(x)
        if x.dtype != torch.float32 or out.dtype != torch.float32:
            return out + adapter.forward(x.float()).to(out.dtype)
        return adapter.add_to(out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1])).view(out.shape)

    @staticmethod
    def _plain_base(base: nn.Module) -> bool:
        """A plain ``nn.Linear`` with no hooks of its own (nor a patched ``forward``, as accelerate's
        offloading installs): it is applied with ``F.linear`` directly, the same op without a second
        module call per layer (global module hooks are not run for it)."""
        return type(base) is nn.Linear and not (base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen linear's output (``F.linear`` for a plain one, see ``_plain_base``)."""
        base = self.base_layer
        return F.linear(x, base.weight, base.bias) if self._plain_base(base) else base(x)

    def merge(self, name: str) -> None:
        """Add adapter ``name``'s update into the base weight (full-precision bases only)."""
        if self.merged_adapter is not None:
            raise RuntimeError(f"LoRA adapter {self.merged_adapter!r} is already merged; unmerge it first")
        if is_4bit(self.base_layer):
            raise ValueError(NO_4BIT_MERGE)
        w = self.base_layer.weight
        w.data.copy_((w.data.float() + self.adapters[name].delta_weight()).to(w.dtype))
        self.merged_adapter = name

    def unmerge(self) -> None:
        """Subtract the merged update again, restoring the base weight."""
        if self.merged_adapter is None:
            return
        w = self.base_layer.weight
        w.data.copy_((w.data.float() - self.adapters[self.merged_adapter].delta_weight()).to(w.dtype))
        self.merged_adapter = None


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every LoRA wrapper of ``model`` by its module path (a walk that does not grow with the
    adapters resident)."""
    return {path: m for path, m in base_modules(model) if isinstance(m, LoraLinear)}


def is_linear(module: nn.Module) -> bool:
    """What LoRA can wrap: a linear (Linear4bit is one) or an existing LoRA wrapper."""
    return isinstance(module, (nn.Linear, LoraLinear))


def inject_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                weights: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                trainable: bool = True) -> list[LoraAdapter]:
    """Wrap every targeted linear (or reuse its wrapper) and add adapter ``adapter_name``;
    the new adapter becomes the active one. Returns the new adapters (frozen unless ``trainable``). ``weights``
    (module path -> (A, B), one pair per target, as ``load_adapter`` found and checked them)
    makes the adapters of a saved pair each instead of a fresh init, without a second search; the
    adapters take those tensors as their weights (see ``LoraLinear.add_adapter``)."""
    refuse_if_merged(model, "add a LoRA adapter")
    if weights is None:
        paths = [t.path for t in find_targets(model, config.targets, accept=is_linear, kind="linear")]
    else:
        paths = list(weights)
    modules = [_submodule(model, path) for path in paths]
    bases = [m.base_layer if isinstance(m, LoraLinear) else m for m in modules]
    if config.load_in_4bit and not all(is_4bit(b) for b in bases):
        plain = [path for path, b in zip(paths, bases) if not is_4bit(b)][:3]
        raise ValueError(
            f"the config is QLoRA (load_in_4bit: true) but targeted linears such as {plain} are not 4-bit; "
            "load the base with vla_peft.load_vlm(path, load_in_4bit=True), or set load_in_4bit: false"
        )
    active = getattr(model, "lora_active_adapter", None)
    if active is None:
        active = ActiveAdapter()
        model.lora_active_adapter = active
    created = []
    for path, layer in zip(paths, modules):
        if not isinstance(layer, LoraLinear):
            layer = LoraLinear(layer, active)
            _replace(model, path, layer)
        if layer.merged_adapter is not None:
            raise RuntimeError(f"{path} has a merged LoRA adapter; unmerge it before adding another")
        created.append(layer.add_adapter(adapter_name, config, None if weights is None else weights[path], trainable))
    active.name = adapter_name
    return created


def merge_lora(model: nn.Module) -> None:
    """Fold the active adapter into the base weights and put the bare base linears back in place
    of the LoRA wrappers, so the merged model is the plain base architecture: no overhead at all,
    and ``save_pretrained`` writes an ordinary checkpoint. The wrappers wait in
    ``model.lora_merged`` for ``unmerge_lora``."""
    refuse_if_merged(model, "merge again")
    name = _active_name(model)
    layers = lora_layers(model)
    if any(is_4bit(layer.base_layer) for layer in layers.values() if name in layer.adapters):
        raise ValueError(NO_4BIT_MERGE)
    for path, layer in layers.items():
        if name in layer.adapters:
            layer.merge(name)
        _replace(model, path, layer.base_layer)
    model.lora_merged = layers


def unmerge_lora(model: nn.Module) -> None:
    """Undo ``merge_lora``: the base weights come back (to float rounding), wrappers and all."""
    layers = getattr(model, "lora_merged", None)
    if layers is None:
        raise ValueError("the model is not merged (merge_lora was not called), so there is nothing to unmerge")
    for path, layer in layers.items():
        layer.unmerge()
        _replace(model, path, layer)
    del model.lora_merged


def refuse_if_merged(model: nn.Module, action: str) -> None:
    if getattr(model, "lora_merged", None) is not None:
        raise RuntimeError(f"cannot {action}: LoRA is merged into the base weights; call unmerge_lora(model) first")


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(_submodule(model, parent_path), child, module)


def _submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` for a path known to exist (found by ``find_targets`` or checked
    against a file's keys by ``load_adapter``), read straight from the module tables: a sixth of
    get_submodule's cost, which a bank load pays once per LoRA layer."""
    for name in path.split(".") if path else ():
        model = model._modules[name]
    return model


def merged_copy(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A new full-precision model with the active LoRA adapter merged and no PEFT modules left.

    This is the way to merge over a 4-bit base: the NF4 weights are dequantised (exactly as the
    4-bit forward does), the update is added in float32, and nothing is rounded back to 4 bits.
    The copy can be saved with ``save_pretrained`` like any transformers model.
    """
    name = _active_name(model)
    others = {type(m).__name__ for m in model.modules() if isinstance(m, PeftModule) and not isinstance(m, LoraAdapter)}
    if others:
        raise ValueError(f"only LoRA can be merged; this model also has {sorted(others)} modules")
    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = type(model)(config).to(dtype)
    wrappers = lora_layers(model)
    wrapped = {id(layer.base_layer) for layer in wrappers.values()}
    quantised = {p: m for p, m in model.named_modules() if is_4bit(m) and id(m) not in wrapped}
    state: dict[str, torch.Tensor] = {}
    for path, module in {**wrappers, **quantised}.items():
        base = module.base_layer if isinstance(module, LoraLinear) else module
        weight = dense_weight(base).float()
        if isinstance(module, LoraLinear) and module.merged_adapter is None and name in module.adapters:
            weight = weight + module.adapters[name].delta_weight()
        state[f"{path}.weight"] = weight
        if base.bias is not None:
            state[f"{path}.bias"] = base.bias.data
    replaced = tuple(f"{path}." for path in (*wrappers, *quantised))
    for key, value in model.state_dict().items():
        if not key.startswith(replaced):
            state[key] = value
    plain.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return plain.eval()


def _active_name(model: nn.Module) -> str:
    active = getattr(model, "lora_active_adapter", None)
    if active is None or active.name is None:
        raise ValueError("the model has no active LoRA adapter; inject a LoRA config first (vla_peft.inject)")
    return active.name
