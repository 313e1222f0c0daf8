"""Building the frozen OpenCLIP backbone from a model name plus weights (SPEC §1)."""

from __future__ import annotations

import contextlib
import copy
import logging
import pickle
import re
from pathlib import Path

import open_clip
import torch
from torch import nn

from aaclip_core.errors import WeightsError
from aaclip_core.recipe import Recipe

# Where users without network access can fetch the OpenAI weights in OpenCLIP's own format.
_WEIGHTS_HINT = {
    ("ViT-L-14-336", "openai"): "open_clip_model.safetensors from the Hugging Face repository "
    "timm/vit_large_patch14_clip_336.openai",
}


def register_custom_config(name: str, config: dict) -> None:
    """Make an OpenCLIP model config (e.g. the tiny test backbone) buildable by name."""
    from open_clip import factory

    factory._MODEL_CONFIGS[name] = copy.deepcopy(config)


def weights_kind(pretrained: str) -> str:
    """How ``model.pretrained`` is read: "random" weights, a local "file", or an OpenCLIP "tag"."""
    if pretrained.lower() in ("", "none", "random"):
        return "random"
    if Path(pretrained).suffix or Path(pretrained).expanduser().exists() or "/" in pretrained:
        return "file"
    return "tag"


def _resolve_weights(name: str, pretrained: str) -> Path | None:
    kind = weights_kind(pretrained)
    if kind == "random":
        return None
    path = Path(pretrained).expanduser()
    if kind == "file":
        if not path.is_file():
            raise WeightsError(
                f"Backbone weights file '{path}' (model.pretrained) does not exist. Put the OpenCLIP "
                f"weights for {name} there, or set model.pretrained to an OpenCLIP tag such as 'openai' "
                "on a machine with network access."
            )
        return path
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise WeightsError(
            f"model.pretrained = '{pretrained}' is neither a file nor an OpenCLIP tag of {name} "
            f"(tags: {tags})."
        )
    try:
        return Path(open_clip.download_pretrained(cfg))
    except Exception as exc:  # network errors come in many types; all mean the same to the user
        hint = _WEIGHTS_HINT.get((name, pretrained), f"the OpenCLIP weights of {name} ({pretrained})")
        raise WeightsError(
            f"Could not obtain the '{pretrained}' weights of {name} ({type(exc).__name__}); this "
            f"machine may be offline. Download {hint} on a machine with network access, copy it "
            f"here and set model.pretrained = \"/path/to/open_clip_model.safetensors\" "
            f"(--set model.pretrained=PATH)."
        ) from None


def build_clip(recipe: Recipe, device: torch.device | str = "cpu") -> nn.Module:
    """The frozen CLIP model in eval mode at the recipe's image size.

    The positional embedding is interpolated from the native grid by OpenCLIP's own loader when the
    weights are read (`force_image_size`), as the reference did.
    """
    m = recipe.model
    if m.custom_config is not None:
        register_custom_config(m.name, m.custom_config)
    weights = _resolve_weights(m.name, m.pretrained)
    try:
        # Weights are loaded below, so OpenCLIP's "no pretrained weights loaded" warning is noise.
        with _silence_logging(), _seeded(recipe.runtime.seed if weights is None else None):
            model = open_clip.create_model(
                m.name,
                pretrained=None,
                force_quick_gelu=recipe.quick_gelu,
                force_image_size=m.image_size,
                force_patch_dropout=0.0,
            )
    except RuntimeError as exc:
        raise WeightsError(
            f"OpenCLIP has no model config '{m.name}' (model.name): {exc}. Known names include "
            "ViT-L-14-336 and ViT-B-16; a custom architecture goes in model.custom_config."
        ) from None
    if weights is not None:
        try:
            open_clip.load_checkpoint(model, str(weights), weights_only=True)
        except Exception as exc:
            raise WeightsError(_unfit_weights(weights, m.name, exc)) from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SIZE_MISMATCH = re.compile(
    r"size mismatch for ([^:\s]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[([^\]]*)\]\)"
)
_KEYS = re.compile(r"(Missing|Unexpected) key\(s\) in state_dict: ([^\n]*)")
_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _shape(text: str) -> str:
    return "x".join(d.strip() for d in text.split(",") if d.strip()) or "a scalar"


def _unfit_weights(path: Path, name: str, exc: Exception) -> str:
    """One paragraph for weights OpenCLIP could not load: a pickled file, other shapes, or else the
    first line of the loader's message (torch's own explanations run to many lines, with colour codes)."""
    text = _ANSI.sub("", str(exc))
    fix = (f"Point model.pretrained at OpenCLIP weights for {name} (an open_clip .safetensors file or a state "
           "dict saved with tensors only), or set model.name to the architecture the file was saved for.")
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        found = _GLOBAL.search(text)
        what = f" (such as {found.group(1)})" if found else ""
        return (
            f"Weights file '{path}' is a pickled PyTorch file that holds Python objects besides tensors{what}; "
            "aaclip reads tensors only and does not run pickled code. Only if you trust where it came from, convert "
            "it to safetensors: python -c \"import torch; from safetensors.torch import save_file; "
            f"o = torch.load('{path}', map_location='cpu', weights_only=False); o = o.get('state_dict', o); "
            f"save_file({{k: v.contiguous() for k, v in o.items() if torch.is_tensor(v)}}, "
            f"'{path.with_suffix('.safetensors')}')\" and set model.pretrained to the new file."
        )
    mismatched = _SIZE_MISMATCH.findall(text)
    keys = {kind: [k.strip(" '\"") for k in listed.rstrip(". ").split(",") if k.strip()] for kind, listed in
            _KEYS.findall(text)}
    if mismatched or keys:
        parts = []
        if mismatched:
            key, found, wanted = mismatched[0]
            parts.append(f"{len(mismatched)} tensor(s) have other shapes (e.g. {key}: the file has "
                         f"{_shape(found)}, {name} needs {_shape(wanted)})")
        for kind, listed in keys.items():
            parts.append(f"{len(listed)} tensor(s) are {kind.lower()} (e.g. {listed[0] if listed else '?'})")
        return f"Weights file '{path}' does not fit {name}: {'; '.join(parts)}. {fix}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return f"Weights file '{path}' cannot be loaded into {name}: {first.rstrip('.')}. {fix}"


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Random backbone weights drawn from the recipe's seed on a forked generator: training, test,
    predict and doctor all rebuild the identical backbone, and the caller's RNG is untouched."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _silence_logging():
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def backbone_id(recipe: Recipe) -> str:
    m = recipe.model
    return f"{m.name}:{Path(m.pretrained).name if '/' in m.pretrained else m.pretrained}@{m.image_size}"
