"""AdapterBank: one loaded base model, many task bundles, switched by name.

A bundle (``vla-peft train``'s output) is the LoRA weights plus the policy's own parts: action
head, action queries, proprio projector and normalisation statistics. Registering a bundle adds
its LoRA as one more named adapter to the base's LoRA layers and builds a ``VLAPolicy`` for its
own parts that shares the base. ``activate(name)`` then switches all of them together:

- ``unmerged``: every bundle stays resident; switching sets the one attribute all LoRA layers
  read (``vlm.lora_active_adapter.name``), so its cost does not grow with the number of
  bundles, and each bundle costs only its own parameters.
- ``merged``: the active LoRA is folded into the base weights, so inference costs what the bare
  base costs; switching unmerges the old update and merges the new one, layer by layer (its
  cost grows with the LoRA layers a bundle touches, not with the bundles resident). Full-precision
  bases only: folding into NF4 weights would round them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from torch import nn

from vla_peft.peft import LoraConfig, inject, load_adapter
from vla_peft.peft.lora import is_4bit, lora_layers
from vla_peft.policy import PolicyConfig, VLAPolicy
from vla_peft.policy.bundle import base_fingerprint, check_base, read_manifest, read_own_files
from vla_peft.policy.peft_link import load_method

MODES = ("unmerged", "merged")


class AdapterBank:
    """Task bundles over one frozen base; ``activate(name)`` returns the policy to act with."""

    def __init__(self, vlm: nn.Module, processor=None, mode: str = "unmerged") -> None:
        if mode not in MODES:
            raise ValueError(f"AdapterBank mode {mode!r} is unknown: use one of {MODES}")
        if mode == "merged" and any(is_4bit(m) for m in vlm.modules()):
            raise ValueError(
                "merged mode needs a full-precision base, but this base is 4-bit (NF4): merging would round the "
                "LoRA update into 4-bit weights. Use mode='unmerged' (same outputs), or load the base in "
                "float32/bfloat16"
            )
        self.vlm = vlm.requires_grad_(False).eval()
        self.processor = processor
        self.mode = mode
        self.policies: dict[str, VLAPolicy] = {}
        self.active: str | None = None
        self.failed: dict[str, str] = {}  # bundles a loader could not register: name -> why (the server reports them)
        self._layers = list(lora_layers(vlm).values())  # walked once here, not at every switch
        self._fingerprint = base_fingerprint(vlm)  # the frozen base's hash, computed once, not per load

    @classmethod
    def from_base(cls, base: str | Path, dtype: str = "float32", load_in_4bit: bool = False,
                  mode: str = "unmerged") -> AdapterBank:
        """Load the base checkpoint once (see ``vla_peft.load_vlm``)."""
        from vla_peft.models import load_vlm

        vlm, processor = load_vlm(base, dtype=dtype, load_in_4bit=load_in_4bit)
        return cls(vlm, processor, mode)

    @classmethod
    def for_bundle(cls, bundle: str | Path, mode: str = "unmerged", base: str | None = None) -> AdapterBank:
        """A bank on the base that ``bundle`` was trained on (or ``base``), as its manifest names it;
        in merged mode a QLoRA bundle's base is loaded in full precision (same fingerprint)."""
        config = read_manifest(bundle)[1]
        load_in_4bit = config.load_in_4bit and mode == "unmerged"
        return cls.from_base(base or config.base, dtype=config.dtype, load_in_4bit=load_in_4bit, mode=mode)

    # ------------------------------------------------------------------ registering
    @property
    def names(self) -> list[str]:
        return list(self.policies)

    @property
    def policy(self) -> VLAPolicy:
        """The active task's policy."""
        if self.active is None:
            raise RuntimeError(f"no bundle is active; call activate(name) with one of {self.names}")
        return self.policies[self.active]

    def register(self, name: str, bundle: str | Path | VLAPolicy) -> VLAPolicy:
        """Add a bundle from a directory or from a policy in memory (e.g. just trained, on this
        base or on another copy of it). A bundle made for another base is refused here, before
        anything changes, naming what differs. The active bundle stays active."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a bundle name must be a non-empty string (got {name!r})")
        if name in self.policies:
            raise ValueError(f"a bundle named {name!r} is already registered; choose another name or a new bank")
        configs = getattr(self.vlm, "peft_config_vla", None) or {}
        if name in configs:
            raise ValueError(f"the base already has an adapter named {name!r}; choose another bundle name")
        with self._unmerged():
            if isinstance(bundle, VLAPolicy):
                policy = self._from_memory(name, bundle)
            else:
                policy = self._from_disk(name, Path(bundle))
            if policy.method_config is not None and not self._lists_layers_of(name):
                self._layers = list(lora_layers(self.vlm).values())
        self.policies[name] = _frozen_own_parts(policy)
        return policy

    def _lists_layers_of(self, name: str) -> bool:
        """Whether every LoRA adapter just added as ``name`` sits in a layer the bank already lists;
        if not, the bundle wrapped new layers and the model must be walked for them."""
        return sum(name in layer.adapters for layer in self._layers) == len(self.vlm.peft_trainable)

    def remove(self, name: str) -> None:
        """Drop bundle ``name`` and what it holds (its LoRA in every layer, its own parts and
        statistics), e.g. a task the robot is done with; the other bundles are untouched and the name
        can be registered again. The active bundle stays: activate another one first."""
        if name not in self.policies:
            raise KeyError(f"no bundle named {name!r} in this bank; registered: {self.names}")
        if name == self.active:
            raise ValueError(f"bundle {name!r} is active; activate another one (or call unmerge_all) before removing it")
        for layer in self._layers:
            if name in layer.adapters:
                del layer.adapters[name]
        vlm = self.vlm
        vlm.peft_config_vla = {n: c for n, c in getattr(vlm, "peft_config_vla", {}).items() if n != name}
        # inject keeps the last adapters it made, to freeze them at the next inject: not these any more
        vlm.peft_trainable = [m for m in getattr(vlm, "peft_trainable", []) if getattr(m, "adapter_name", None) != name]
        del self.policies[name]

    def _from_disk(self, name: str, path: Path) -> VLAPolicy:
        manifest, config = read_manifest(path)
        check_base(manifest, self.vlm, path, fingerprint=self._fingerprint)
        method = load_method(manifest["method"])
        self._check_method(method, str(path))
        state, normalizers = read_own_files(path)
        acting = {k: v for k, v in state.items() if not k.startswith("aux_head.")}  # the aux head only trains
        policy = VLAPolicy(config, self.vlm, self.processor, own_state=acting)
        policy.normalizers = normalizers
        if method is not None:  # last: a bundle refused above leaves the base untouched
            load_adapter(self.vlm, path / "adapter", adapter_name=name, report=False, frozen=True)
        policy.method_config = method
        return policy

    def _from_memory(self, name: str, source: VLAPolicy) -> VLAPolicy:
        if source.vlm is not self.vlm and base_fingerprint(source.vlm) != self._fingerprint:
            raise ValueError(
                f"bundle {name!r}: the policy was built on another base model than this bank's; "
                "register it on a bank over its own base"
            )
        if source.normalizers is None:
            raise ValueError(f"bundle {name!r}: the policy has no normalisation statistics; train it first")
        method = source.method_config
        self._check_method(method, name)
        own = {k: v.clone() for k, v in source.own_state_dict().items() if not k.startswith("aux_head.")}
        policy = VLAPolicy(source.config, self.vlm, self.processor, own_state=own)
        policy.normalizers = source.normalizers
        if method is not None:
            source_name = source.vlm.lora_active_adapter.name
            sources = {p: layer.adapters[source_name] for p, layer in lora_layers(source.vlm).items()
                       if source_name in layer.adapters}
            inject(self.vlm, method, adapter_name=name, report=False, frozen=True)
            targets = lora_layers(self.vlm)
            for path, adapter in sources.items():
                targets[path].adapters[name].load_state_dict(adapter.state_dict())
        policy.method_config = method
        return policy

    @staticmethod
    def _check_method(method, where: str) -> None:
        if method is not None and not isinstance(method, LoraConfig):
            raise ValueError(
                f"bundle {where} uses {method.method!r}; AdapterBank hot-swaps LoRA (and head-only) bundles. "
                "Load this one on its own with vla_peft.policy.bundle.load_bundle"
            )

    # ------------------------------------------------------------------ switching
    def activate(self, name: str) -> VLAPolicy:
        """Make bundle ``name`` the one that acts (PEFT weights, head, proprio, statistics)."""
        policy = self.policies.get(name)
        if policy is None:
            raise KeyError(f"no bundle named {name!r} in this bank; registered: {self.names}")
        if name == self.active:
            return policy
        if self.mode == "merged":
            self._unmerge()
            self._set_lora(name)
            if policy.method_config is not None:
                for layer in self._layers:
                    if name in layer.adapters:
                        layer.merge(name)
        else:
            self._set_lora(name)
        self.active = name
        return policy

    def unmerge_all(self) -> None:
        """Restore the base weights (merged mode) and deactivate every bundle."""
        self._unmerge()
        self._set_lora(None)
        self.active = None

    def _unmerge(self) -> None:
        for layer in self._layers:
            layer.unmerge()

    def _set_lora(self, name: str | None) -> None:
        holder = getattr(self.vlm, "lora_active_adapter", None)
        if holder is not None:
            has_lora = name is not None and self.policies[name].method_config is not None
            holder.name = name if has_lora else None

    @contextlib.contextmanager
    def _unmerged(self):
        """Registering injects into the LoRA layers, which must not hold a merged update meanwhile."""
        active = self.active
        if self.mode == "merged":
            self._unmerge()
        try:
            yield
        finally:
            self.active = None
            self._set_lora(None)
            if active is not None:
                self.activate(active)

    # ------------------------------------------------------------------ acting
    def predict_chunk(self, obs: dict, binarize_gripper: bool | None = None):
        """The active policy's ``predict_chunk``."""
        return self.policy.predict_chunk(obs, binarize_gripper=binarize_gripper)

    def predict_mixed(self, obs: dict, names: list[str], binarize_gripper: bool | None = None):
        """Action chunks for a batch whose row i is served by bundle ``names[i]``, in one language-model
        forward (inference only, unmerged mode); see ``vla_peft.serve.mixed``."""
        from vla_peft.serve.mixed import predict_mixed

        return predict_mixed(self, obs, names, binarize_gripper)

    @property
    def config(self) -> PolicyConfig:
        return self.policy.config


def _frozen_own_parts(policy: VLAPolicy) -> VLAPolicy:
    """Freeze the policy's own parts and put them in eval mode, leaving the shared base alone: it is
    frozen and in eval already, and walking it (every resident adapter with it) made loads grow with N."""
    for child in policy.children():
        if child is not policy.vlm:
            child.requires_grad_(False).eval()
    for param in policy._parameters.values():
        if param is not None:
            param.requires_grad_(False)
    policy.training = False
    return policy
