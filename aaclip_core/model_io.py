"""From a stored run to a working model: the run's recipe, one of its checkpoints, and the model
rebuilt from both. It sits below the jobs so that `predict`, `doctor` and `compare` load models
without reaching up into the job package."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .backbone import backbone_id
from .checkpoints import CHECKPOINT_CORE_FILES, FINAL, Checkpoint, load_checkpoint
from .config import Recipe, recipe_from_dict
from .data.prompt_names import MANIFEST_KEY
from .errors import CheckpointError
from .model import AACLIP, build_model
from .tracking import TAG, download, get_run


def manifest(recipe: Recipe, model: AACLIP, stage: str, epoch: int, loop: int | None = None, *,
             prompt_names: dict, **extra) -> dict:
    """What a checkpoint's manifest records about the model it holds. ``prompt_names``: the names its
    text side was trained with (``AnchorBank.record()``), which evaluation keeps using."""
    return {
        "stage": stage,
        "epoch": epoch,
        "loop": loop,
        "fidelity": recipe.fidelity,
        "backbone": backbone_id(recipe),
        "cross_attention": model.text_cross_attn is not None,
        "cross_attention_on": {"text": model.use_text_cross, "image": model.use_image_cross},
        "context_source": model.context_source,
        "recipe": recipe.model_dump(mode="json"),
        MANIFEST_KEY: prompt_names,
        **extra,
    }


def load_adapters(model: AACLIP, state: dict[str, torch.Tensor]) -> None:
    """Load a (possibly partial) adapter state: keys it lacks, e.g. fresh cross-attention modules,
    keep their current values; keys or shapes the model lacks are refused."""
    current = model.adapter_state_dict()
    unknown = sorted(set(state) - set(current))
    if unknown:
        raise CheckpointError(f"Checkpoint has keys this model lacks: {', '.join(unknown[:3])}.")
    current.update({k: v.to(current[k].device) for k, v in state.items()})
    try:
        model.load_adapter_state_dict(current)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"Checkpoint does not fit the model: {exc}.") from None


def model_from_checkpoint(recipe: Recipe, ckpt: Checkpoint, device: torch.device) -> AACLIP:
    meta = ckpt.manifest
    model = build_model(recipe, device, with_cross=bool(meta.get("cross_attention")))
    try:
        model.load_adapter_state_dict({k: v.to(device) for k, v in ckpt.adapters.items()})
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"Checkpoint does not fit the run's recipe: {exc}.") from None
    model.context_source = meta.get("context_source", "dpam")
    switches = meta.get("cross_attention_on")
    if switches:
        model.use_text_cross, model.use_image_cross = bool(switches["text"]), bool(switches["image"])
    return model


# ------------------------------------------------------------------------------------------ from a run


def run_recipe(mlflow, run_id: str, workdir: Path) -> Recipe:
    run_id = get_run(mlflow, run_id).info.run_id  # the full id, when given a prefix
    path = download(mlflow, run_id, "recipe.json", workdir / run_id)
    return recipe_from_dict(json.loads(path.read_text(encoding="utf-8")), f"of run {run_id}")


def run_checkpoint(mlflow, run_id: str, name: str, workdir: Path, with_optimizer: bool = False) -> Checkpoint:
    """A run's checkpoint, downloaded. Only the adapters and the manifest unless the optimiser and
    random states are wanted (resume): from a server those are most of the bytes, and evaluating
    or starting from a checkpoint never reads them."""
    dst = workdir / run_id / "ckpt"
    if with_optimizer:
        local = download(mlflow, run_id, f"checkpoints/{name}", dst)
    else:
        for file in CHECKPOINT_CORE_FILES:
            local = download(mlflow, run_id, f"checkpoints/{name}/{file}", dst).parent
    return load_checkpoint(local, with_optimizer=with_optimizer)


def default_checkpoint(mlflow, run_id: str) -> str:
    """The checkpoint a run declares as its result (a feedback run: the held-out selected loop)."""
    run = get_run(mlflow, run_id)
    return run.data.tags.get(f"{TAG}selected_checkpoint", FINAL)
