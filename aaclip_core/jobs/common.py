"""What every job shares: session set-up, run tags, checkpoint logging and loading runs back."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..anchors import AnchorBank
from ..backbone import backbone_id
from ..checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from ..config import Recipe, flatten, recipe_from_dict
from ..data import Sample, write_metadata_jsonl
from ..errors import CheckpointError, ConfigError
from ..model import AACLIP, build_model
from ..runtime import configure_threads, seed_everything, select_device
from ..tracking import TAG, aaclip_version, connect, download, get_run, git_commit, log_json_artifact, log_params
from ..training.data import fixed_batch, load_samples, make_dataset, make_loader
from .reporter import Reporter


@dataclass
class Session:
    recipe: Recipe
    device: torch.device
    mlflow: Any
    reporter: Reporter
    workdir: Path
    generator: torch.Generator
    recipe_path: Path | None = None
    extra_tags: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def open_session(recipe: Recipe, recipe_path: Path | None, tracking_uri: str | None, reporter: Reporter | None) -> Session:
    configure_threads(recipe.runtime.threads)
    generator = seed_everything(recipe.runtime.seed)
    device = select_device(recipe.runtime.device)
    mlflow = connect(tracking_uri)
    workdir = Path(tempfile.mkdtemp(prefix="aaclip-"))
    return Session(recipe, device, mlflow, reporter or Reporter(), workdir, generator, recipe_path)


def run_tags(recipe: Recipe, stage: str, dataset: str) -> dict[str, str]:
    return {
        f"{TAG}stage": stage,
        f"{TAG}fidelity": recipe.fidelity,
        f"{TAG}dataset": dataset,
        f"{TAG}seed": str(recipe.runtime.seed),
        f"{TAG}version": aaclip_version(),
        f"{TAG}git_commit": git_commit(),
        f"{TAG}backbone": backbone_id(recipe),
        f"{TAG}quick_gelu": str(recipe.quick_gelu).lower(),
        f"{TAG}recipe": recipe.name,
    }


def log_recipe(session: Session) -> None:
    mlflow = session.mlflow
    log_params(mlflow, flatten(session.recipe))
    log_json_artifact(mlflow, session.recipe.model_dump(mode="json"), "recipe.json")
    if session.recipe_path is not None and session.recipe_path.is_file():
        mlflow.log_artifact(str(session.recipe_path), "recipe_source")


def log_metadata(session: Session, samples: list[Sample], name: str, root: str) -> None:
    """The sample list a run actually used, in the reference JSON-lines format."""
    path = session.workdir / name
    write_metadata_jsonl(samples, path, Path(root).expanduser().resolve())
    session.mlflow.log_artifact(str(path), "data")


def manifest(recipe: Recipe, model: AACLIP, stage: str, epoch: int, loop: int | None = None, **extra) -> dict:
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
        **extra,
    }


def save_checkpoint_dir(session: Session, name: str, model: AACLIP, meta: dict, **states) -> Path:
    """Write a checkpoint of the model's trainable state into the session's work directory."""
    return save_checkpoint(session.workdir / "checkpoints" / name, model.adapter_state_dict(), meta, **states)


def save_and_log(session: Session, name: str, model: AACLIP, meta: dict, optimizer_state: dict | None = None) -> Path:
    local = save_checkpoint_dir(session, name, model, meta, optimizer_state=optimizer_state)
    session.mlflow.log_artifacts(str(local), f"checkpoints/{name}")
    return local


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


def probe_batch(samples: list[Sample], recipe: Recipe, size: int = 16) -> dict:
    """A fixed, un-augmented batch spread over the training images, for the per-epoch probe loss."""
    step = max(1, len(samples) // size)
    return fixed_batch(samples[::step][:size], recipe)


def train_data(session: Session, recipe: Recipe) -> list[Sample]:
    samples = load_samples(recipe.data.train, recipe.runtime.seed)
    session.reporter.info(
        f"train data: {len(samples)} images of {len({s.class_name for s in samples})} classes "
        f"from {recipe.data.train.root}"
    )
    return samples


def loaders(session: Session, samples: list[Sample]):
    r = session.recipe
    text_ds = make_dataset(samples, r, augment="geometric")
    image_ds = make_dataset(samples, r, augment="geometric+colour")
    return (
        make_loader(text_ds, r.stage1.batch_size, True, r, session.generator),
        make_loader(image_ds, r.stage2.batch_size, True, r, session.generator),
    )


# ------------------------------------------------------------------------------------------ loading runs


def run_recipe(mlflow, run_id: str, workdir: Path) -> Recipe:
    get_run(mlflow, run_id)
    path = download(mlflow, run_id, "recipe.json", workdir / run_id)
    return recipe_from_dict(json.loads(path.read_text(encoding="utf-8")), f"of run {run_id}")


def run_checkpoint(mlflow, run_id: str, name: str, workdir: Path, with_optimizer: bool = False) -> Checkpoint:
    local = download(mlflow, run_id, f"checkpoints/{name}", workdir / run_id / "ckpt")
    return load_checkpoint(local, with_optimizer=with_optimizer)


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


def default_checkpoint(mlflow, run_id: str) -> str:
    run = get_run(mlflow, run_id)
    return run.data.tags.get(f"{TAG}selected_checkpoint", "final")


def anchor_bank(model: AACLIP, samples: list[Sample], dataset_name: str) -> AnchorBank:
    return AnchorBank(model, [s.class_name for s in samples], dataset_name)


def check_trainable(recipe: Recipe) -> None:
    """Settings that are valid for evaluation but not for training."""
    if recipe.runtime.precision == "fp16":
        raise ConfigError(
            "runtime.precision = 'fp16' is for evaluation only: fp16 training would need loss scaling. "
            "Train with bf16 (GPU) or fp32."
        )


def check_train_samples(recipe: Recipe) -> None:
    check_trainable(recipe)
    if recipe.stage1.epochs == 0 and recipe.stage2.epochs == 0:
        raise ConfigError("stage1.epochs and stage2.epochs are both 0: nothing to train.")
