"""Task bundles: everything a trained policy adds to its frozen base, in one directory.

    bundle.json               policy / method / data configs, base name and fingerprint, package versions
    policy.safetensors        action queries, action head, proprio projector
    normalizers.safetensors   action and state statistics with their modes (vla_peft.data format)
    adapter/                  the PEFT weights (LoRA in HF peft's format) via vla_peft.peft io; absent for head-only

Never the frozen base. The fingerprint holds the base's architecture and a hash of two of its
frozen tensors, so a bundle refuses a base with the same shapes but other weights (a random
tiny base in place of the pretrained one) as clearly as one of another architecture.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load, save_file
from torch import nn

from vla_peft.data.stats import load_normalizers, save_normalizers
from vla_peft.peft.io import fill_adapter
from vla_peft.policy.config import PolicyConfig
from vla_peft.policy.peft_link import load_method, load_method_weights, save_method
from vla_peft.policy.policy import VLAPolicy

FORMAT_VERSION = 1
MANIFEST = "bundle.json"


class BundleMismatchError(ValueError):
    """A bundle loaded onto a base model it was not trained on."""


class BundleFileError(ValueError):
    """A bundle file that is missing, truncated or malformed; the message names the file and the fix."""


def _damaged(file: Path, err: Exception) -> BundleFileError:
    return BundleFileError(f"{file} is damaged ({type(err).__name__}: {err}); it is probably truncated or corrupt "
                           "(an interrupted copy?): copy the bundle again, or re-export it with `vla-peft train`")


def base_fingerprint(vlm: nn.Module) -> dict:
    """Architecture, sizes, and a hash of the token embeddings and patch embedding (rounded to
    bfloat16, so the same checkpoint loaded in fp32, bf16 or NF4 gives the same hash)."""
    cfg = vlm.config
    digest = hashlib.sha256()
    for tensor in (vlm.get_input_embeddings().weight, vlm.model.vision_tower.get_input_embeddings().weight):
        digest.update(tensor.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return {
        "architecture": type(vlm).__name__,
        "vision": {k: getattr(cfg.vision_config, k, None) for k in ("hidden_size", "num_hidden_layers", "image_size", "patch_size")},
        "text": {k: getattr(cfg.text_config, k, None) for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "weights_sha256": digest.hexdigest()[:16],
    }


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("vla_peft", "torch", "transformers", "accelerate", "safetensors", "bitsandbytes"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def save_bundle(policy: VLAPolicy, path: str | Path, data_config: dict | None = None, extra: dict | None = None) -> Path:
    """Write ``policy``'s bundle to directory ``path`` (replaced atomically)."""
    if policy.normalizers is None:
        raise ValueError("the policy has no normalisation statistics; a bundle without them cannot act")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest = {
        "format_version": FORMAT_VERSION,
        "policy": policy.config.to_dict(),
        "method": None if policy.method_config is None else policy.method_config.to_dict(),
        "data": data_config or {},
        "base": {"name_or_path": policy.config.base, "fingerprint": base_fingerprint(policy.vlm)},
        "versions": package_versions(),
        **(extra or {}),
    }
    save_file(policy.own_state_dict(), str(tmp / "policy.safetensors"))
    save_normalizers(tmp / "normalizers.safetensors", policy.normalizers)
    if policy.method_config is not None:
        save_method(policy.vlm, tmp / "adapter")
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path


def read_manifest(path: str | Path) -> tuple[dict, PolicyConfig]:
    """The bundle's manifest and its policy config, parsed once, or one clear error naming the file."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a task bundle: {MANIFEST} is missing (bundles are written by `vla-peft train`)")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise _damaged(file, err) from None
    if not isinstance(manifest, dict):
        raise _damaged(file, ValueError(f"the JSON is a {type(manifest).__name__}, not an object"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: bundle format {manifest.get('format_version')} is not {FORMAT_VERSION}; retrain or upgrade")
    missing = [k for k in ("policy", "method", "base") if k not in manifest]
    if missing or not isinstance(manifest["policy"], dict) or not isinstance(manifest["base"], dict):
        raise _damaged(file, ValueError(f"it lacks {missing or 'a well-formed policy or base entry'}"))
    try:
        return manifest, PolicyConfig.from_dict(manifest["policy"])
    except (TypeError, ValueError) as err:
        raise _damaged(file, err) from None


def read_own_files(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The policy's own weights and its normalisers from a bundle directory, or one clear error
    naming the damaged file."""
    path = Path(path)
    try:
        state = load((path / "policy.safetensors").read_bytes())  # read whole: small, and faster than a memory map
    except FileNotFoundError:
        raise BundleFileError(f"{path / 'policy.safetensors'} is missing: copy the whole bundle directory") from None
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise _damaged(path / "policy.safetensors", err) from None
    try:
        normalizers = load_normalizers(path / "normalizers.safetensors")
    except FileNotFoundError:
        raise BundleFileError(f"{path / 'normalizers.safetensors'} is missing: copy the whole bundle directory") from None
    except Exception as err:  # noqa: BLE001 - as above, and a file without the normalisers' metadata
        raise _damaged(path / "normalizers.safetensors", err) from None
    return state, normalizers


def check_base(manifest: dict, vlm: nn.Module, path: Path, fingerprint: dict | None = None) -> None:
    """Refuse a base the bundle was not trained on, naming what differs. ``fingerprint``: the
    base's, computed once by a caller that loads many bundles onto it."""
    expected, here = manifest["base"]["fingerprint"], fingerprint or base_fingerprint(vlm)
    diffs = [f"{k}: bundle {expected.get(k)!r} vs base {here[k]!r}" for k in here if expected.get(k) != here[k]]
    if diffs:
        raise BundleMismatchError(
            f"the bundle at {path} was trained on another base model ({'; '.join(diffs)}); load it onto its own base "
            f"({manifest['base']['name_or_path']!r}) or retrain it on this one"
        )


def load_bundle(path: str | Path, vlm: nn.Module | None = None, processor=None, base: str | None = None) -> VLAPolicy:
    """Rebuild the trained policy: its base (``vlm`` if given, else loaded from ``base`` or the
    path recorded in the bundle), the PEFT weights, the head, the statistics."""
    path = Path(path)
    manifest, config = read_manifest(path)
    if base is not None:
        config.base = str(base)
    if vlm is None:
        from vla_peft.models import load_vlm

        vlm, processor = load_vlm(config.base, dtype=config.dtype, load_in_4bit=config.load_in_4bit)
    check_base(manifest, vlm, path)
    state, normalizers = read_own_files(path)  # before the base is touched
    policy = VLAPolicy(config, vlm, processor, own_state=state)
    if manifest["method"] is not None:
        load_method_weights(vlm, path / "adapter")
        policy.method_config = load_method(manifest["method"])
    policy.normalizers = normalizers
    policy.requires_grad_(False)
    return policy.eval()


def start_from_bundle(policy: VLAPolicy, path: str | Path) -> None:
    """Start a training from a trained bundle instead of a fresh init (``train.init_from``): a fine-tune,
    or a curriculum from an easier task. Its PEFT weights and own parts (head, queries, proprio
    projector, aux head) replace ``policy``'s fresh ones and stay trainable; the statistics, optimizer
    and schedule are the new run's. The base, the method and every shape must match, or one clear error
    names what differs. An aux head the bundle lacks stays freshly drawn; one the run has no targets for
    is left out."""
    path = Path(path)
    manifest, _ = read_manifest(path)
    check_base(manifest, policy.vlm, path)
    if (manifest["method"] is None) != (policy.method_config is None):
        kind = {True: "head-only", False: "a PEFT method"}
        raise BundleMismatchError(f"train.init_from={path}: the bundle is {kind[manifest['method'] is None]} but this "
                                  f"run is {kind[policy.method_config is None]}; start from a bundle of the same method")
    state, _ = read_own_files(path)
    state = {k: v for k, v in state.items() if policy.aux_head is not None or not k.startswith("aux_head.")}
    if policy.aux_head is not None and not any(k.startswith("aux_head.") for k in state):
        state.update({f"aux_head.{k}": v for k, v in policy.aux_head.state_dict().items()})
    try:
        if manifest["method"] is not None:
            fill_adapter(policy.vlm, path / "adapter")
        policy.load_own_state_dict(state)
    except ValueError as err:
        raise BundleMismatchError(f"train.init_from={path}: {err}") from None
