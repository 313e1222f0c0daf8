"""`aaclip import` and `aaclip export`: reference adapter files into and out of the run registry.

Import turns the reference ``text_adapter.pth`` / ``image_adapter_N.pth`` (SPEC §3-4) into a run
that looks like a trained one: the recipe artifacts and params, checkpoint ``checkpoints/final`` in
aaclip's own safe format (stage "imported") and ``aaclip.selected_checkpoint = final``, so that
``test``, ``train cross --from`` and ``train feedback --from`` take it like any run.

Projection variant: the reference writes ``seg_proj.N.fc.weight`` (relu off) or
``seg_proj.N.fc.0.weight`` (relu on). Import reads the variant from the image file and, when it
differs from the recipe's ``model.relu``, adopts the file's variant into the registered recipe
(reported as a warning and in the run's params), since the file decides which modules exist.

Export writes a run's checkpoint back in the reference layout. The reference format has no place
for cross-attention modules, so such checkpoints are refused rather than silently truncated.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from aaclip_core.checkpoints.checkpoint import (
    FINAL,
    ReferenceFile,
    export_reference,
    map_reference,
    read_reference,
)
from aaclip_core.errors import CheckpointError, ConfigError
from aaclip_core.files import sha256_of
from aaclip_core.jobs import common
from aaclip_core.jobs.import_rules import check_import_sources
from aaclip_core.model import build_model
from aaclip_core.model.backbone import backbone_id
from aaclip_core.prompts.names import training_namer
from aaclip_core.recipe import Recipe, apply_overrides, recipe_from_dict
from aaclip_core.record import Artifact, CheckpointStage, Manifest, Stage, Tag
from aaclip_core.registry.tracking import connect, get_run, log_json_artifact, tracked_run
from aaclip_core.reporter import Reporter

ADAPTER_PREFIXES = ("text_adapter.", "image_adapter.")


def _source_info(ref: ReferenceFile | None) -> dict | None:
    if ref is None:
        return None
    return {
        "path": str(ref.path.resolve()),
        "sha256": ref.sha256,
        "epoch": ref.epoch,
        "tensors": len(ref.state),
        "ignored_entries": ref.extra_keys,
    }


def _adopt_relu(recipe: Recipe, image: ReferenceFile | None) -> tuple[Recipe, bool, list[str]]:
    """The recipe with the image file's projection variant when it differs (the file decides which
    modules exist), whether it was adopted, and the warning saying so."""
    if image is None or image.relu is None or image.relu == recipe.model.relu:
        return recipe, False, []
    before = recipe.model.relu
    data = apply_overrides(recipe.model_dump(mode="json"), [f"model.relu={str(image.relu).lower()}"])
    recipe = recipe_from_dict(data, f"'{recipe.name}' with model.relu adopted from '{image.path}'")
    return recipe, True, [
        f"'{image.path.name}' holds relu={'on' if image.relu else 'off'} projections (keys "
        f"'seg_proj.N.fc{'.0' if image.relu else ''}.weight'); the recipe had model.relu = "
        f"{str(before).lower()}, so the run's recipe uses model.relu = {str(image.relu).lower()}."
    ]


def _import_warnings(text: ReferenceFile | None, image: ReferenceFile | None, seed: int) -> tuple[list[str], list[str]]:
    """(warnings, notes) about what the files leave untrained or do not hold."""
    warnings: list[str] = []
    notes: list[str] = []
    if image is None:
        warnings.append(
            "No --image-adapter: the image adapters keep their untrained Xavier initialisation (seeded "
            f"with runtime.seed = {seed}); pixel maps and image scores come from untrained adapters. "
            f"The run is tagged {Tag.adapter('image_adapter')}=untrained."
        )
    if text is None:
        warnings.append(
            "No --text-adapter: the text anchors come from untrained text adapters (Xavier "
            f"initialisation seeded with runtime.seed = {seed}). The run is tagged "
            f"{Tag.adapter('text_adapter')}=untrained."
        )
    for ref in (text, image):
        if ref is not None and ref.extra_keys:
            notes.append(
                f"'{ref.path.name}': not imported: {', '.join(ref.extra_keys)} (the optimiser state is "
                "not needed to evaluate; training from this run starts fresh optimisers)."
            )
        if ref is not None and ref.epoch is None:
            warnings.append(f"'{ref.path.name}' records no epoch; the checkpoint's epoch is left unknown.")
    return warnings, notes


def _imported_model(session: common.Session, recipe: Recipe, files: tuple[ReferenceFile | None, ...]):
    """The model with the files' adapters; built after seeding, so untrained parts are reproducible."""
    reporter = session.reporter
    reporter.info(f"building {recipe.model.name} ({recipe.model.pretrained}) on {session.device}")
    model = build_model(recipe, session.device)
    own = model.adapter_state_dict()
    state: dict = {}
    for ref in files:
        if ref is not None:
            state.update(map_reference(ref, own))
            reporter.info(f"{ref.kind} adapters: {len(ref.state)} tensors from {ref.path} (epoch {ref.epoch})")
    model.load_adapter_state_dict({k: v.to(session.device) for k, v in state.items()}, strict=False)
    return model


def _import_tags_and_params(recipe: Recipe, status: dict, sources: dict, relu_adopted: bool
                            ) -> tuple[dict[str, str], dict[str, str]]:
    tags = common.run_tags(recipe, Stage.IMPORTED, recipe.data.train.name)
    tags.update({Tag.adapter(part): s for part, s in status.items()})
    tags[Tag.SELECTED_CHECKPOINT] = FINAL
    tags[Tag.RELU] = str(recipe.model.relu).lower()
    params: dict[str, str] = {
        "import.backbone": backbone_id(recipe),
        "import.fidelity": recipe.fidelity,
        "import.relu": str(recipe.model.relu).lower(),
        "import.relu_adopted": str(relu_adopted).lower(),
    }
    for part, info in sources.items():
        params[f"import.{part}.status"] = status[part]
        if info is not None:
            tags[Tag.adapter_sha256(part)] = info["sha256"]
            tags[Tag.adapter_epoch(part)] = str(info["epoch"])
            params[f"import.{part}.sha256"] = info["sha256"]
            params[f"import.{part}.epoch"] = str(info["epoch"])
            params[f"import.{part}.file"] = Path(info["path"]).name
    return tags, params


def import_reference_run(
    recipe: Recipe,
    recipe_path: Path | None = None,
    text_adapter: Path | None = None,
    image_adapter: Path | None = None,
    allow_image_only: bool = False,
    tracking_uri: str | None = None,
    reporter: Reporter | None = None,
    run_name: str | None = None,
) -> dict:
    """Register the reference adapter files as a run holding checkpoint ``final`` (stage "imported").

    Parts without a file keep the model's fresh Xavier initialisation, drawn after seeding with the
    recipe's ``runtime.seed`` (so it is reproducible); the run is tagged ``aaclip.text_adapter`` /
    ``aaclip.image_adapter`` = ``imported`` or ``untrained`` and the result lists warnings.
    """
    check_import_sources(text_adapter, image_adapter, allow_image_only)
    reporter = reporter or Reporter()
    text = read_reference(Path(text_adapter), "text") if text_adapter is not None else None
    image = read_reference(Path(image_adapter), "image") if image_adapter is not None else None
    recipe, relu_adopted, warnings = _adopt_relu(recipe, image)
    seed = recipe.runtime.seed
    more, notes = _import_warnings(text, image, seed)
    warnings += more

    with common.open_session(recipe, recipe_path, tracking_uri, reporter) as session:
        model = _imported_model(session, recipe, (text, image))
        text_epoch = text.epoch if text is not None else 0
        image_epoch = image.epoch if image is not None else 0
        status = {
            "text_adapter": "imported" if text is not None else "untrained",
            "image_adapter": "imported" if image is not None else "untrained",
        }
        sources = {"text_adapter": _source_info(text), "image_adapter": _source_info(image)}
        backbone = backbone_id(recipe)
        tags, params = _import_tags_and_params(recipe, status, sources, relu_adopted)
        name = run_name or f"import-{recipe.name}"
        with tracked_run(session.mlflow, recipe.tracking.experiment, name, tags) as run:
            mlflow = session.mlflow
            common.log_recipe(session)
            mlflow.log_params(params)
            provenance = {
                "sources": sources,
                "status": status,
                "relu": recipe.model.relu,
                "relu_adopted": relu_adopted,
                "backbone": backbone,
                "fidelity": recipe.fidelity,
                "seed": seed,
                "warnings": warnings,
            }
            log_json_artifact(mlflow, provenance, Artifact.IMPORT)
            meta = common.manifest(
                recipe, model, CheckpointStage.IMPORTED, image_epoch, text_epoch=text_epoch, image_epoch=image_epoch,
                imported=provenance,
                # The reference trained these files with its own table: what this recipe names by default.
                prompt_names=training_namer(recipe, recipe.data.train).record([]),
            )
            common.save_and_log(session, FINAL, model, meta)
            mlflow.set_tag(Tag.SELECTED_CHECKPOINT, FINAL)
            return {
                "run_id": run.info.run_id,
                "stage": Stage.IMPORTED,
                "checkpoint": FINAL,
                "text_adapter": sources["text_adapter"],
                "image_adapter": sources["image_adapter"],
                "status": status,
                "text_epoch": text_epoch,
                "image_epoch": image_epoch,
                "relu": recipe.model.relu,
                "relu_adopted": relu_adopted,
                "backbone": backbone,
                "fidelity": recipe.fidelity,
                "recipe": recipe.name,
                "warnings": warnings,
                "notes": notes,
            }


# ------------------------------------------------------------------------------------------ export


def _export_epochs(manifest: Manifest) -> tuple[int, int]:
    """(text epoch, image epoch) of a checkpoint, as the reference files record them."""
    epoch = manifest.epoch
    if manifest.stage == CheckpointStage.STAGE1:
        return int(epoch or 0), 0  # image adapters not trained yet
    text_epoch = manifest.text_epoch if manifest.text_epoch is not None else epoch
    image_epoch = manifest.image_epoch if manifest.image_epoch is not None else epoch
    return int(text_epoch or 0), int(image_epoch or 0)


def export_run(
    run_id: str,
    directory: Path,
    checkpoint: str | None = None,
    tracking_uri: str | None = None,
    reporter: Reporter | None = None,
) -> dict:
    """Write ``text_adapter.pth`` and ``image_adapter_{epoch}.pth`` (reference layout: the adapter
    state dict plus ``epoch``, no optimiser state) from a checkpoint of a run."""
    reporter = reporter or Reporter()
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"'{directory}' exists and is not a directory; pass a directory to export into.")
    mlflow = connect(tracking_uri)
    run_id = get_run(mlflow, run_id).info.run_id  # the full id, when given a prefix
    name = checkpoint or common.default_checkpoint(mlflow, run_id)
    with tempfile.TemporaryDirectory(prefix="aaclip-export-") as tmp:
        ckpt = common.run_checkpoint(mlflow, run_id, name, Path(tmp))
    meta = ckpt.info
    foreign = sorted(k for k in ckpt.adapters if not k.startswith(ADAPTER_PREFIXES))
    if meta.cross_attention or foreign:
        modules = sorted({k.split(".", 1)[0] for k in foreign}) or ["text_cross_attn", "image_cross_attn"]
        raise CheckpointError(
            f"Run {run_id} checkpoint '{name}' holds cross-attention modules ({', '.join(modules)}), "
            "which the reference format (text_adapter.pth, image_adapter_N.pth) has no place for: the "
            "exported files would drop them and score differently. Only checkpoints without "
            "cross-attention (base and imported runs) can be exported; keep this run in aaclip's "
            "format (its checkpoints/ artifacts)."
        )
    text_epoch, image_epoch = _export_epochs(meta)
    reporter.info(f"exporting run {run_id} checkpoint '{name}' (stage {meta.stage}) to {directory}")
    try:
        written = export_reference(ckpt.adapters, directory, text_epoch, image_epoch)
    except OSError as exc:
        raise ConfigError(f"Cannot write into '{directory}': {exc.strerror or exc}.") from None
    relu = bool((meta.recipe or {}).get("model", {}).get("relu", False))
    notes = [
        "No optimiser state: the files hold only the adapters and the epoch (no text_optimizer / "
        "image_optimizer), enough to evaluate or import them, but resuming the reference training "
        "from them starts a fresh optimiser.",
        f"Projections are in the relu={'on' if relu else 'off'} variant (keys "
        f"'seg_proj.N.fc{'.0' if relu else ''}.weight'); load them with the matching relu setting, "
        f"backbone {meta.backbone} and fidelity {meta.fidelity}.",
    ]
    if meta.stage == CheckpointStage.STAGE1:
        notes.append("This is a stage-1 checkpoint: the image adapters in the image file are untrained.")
    return {
        "run_id": run_id,
        "checkpoint": name,
        "stage": meta.stage,
        "directory": str(directory.resolve()),
        "files": [{"path": str(p.resolve()), "sha256": sha256_of(p)} for p in written],
        "text_epoch": text_epoch,
        "image_epoch": image_epoch,
        "relu": relu,
        "backbone": meta.backbone,
        "fidelity": meta.fidelity,
        "optimizer_state": False,
        "notes": notes,
    }
