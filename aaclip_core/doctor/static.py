"""Checks of a recipe without a run: cross-attention weights, activation vs fidelity vs weights,
prompt names vs the reference's, weights available offline, data paths, tracking store, device and precision."""

from __future__ import annotations

import math
import os
from pathlib import Path

from aaclip_core.doctor.checks import CROSS_WEIGHT_BAND, CROSS_WEIGHT_FAIL, Check
from aaclip_core.errors import AaclipError, ConfigError
from aaclip_core.model.backbone import weights_kind
from aaclip_core.prompts.names import differences_from_reference, reference_dataset, reference_table, training_namer
from aaclip_core.recipe import Recipe
from aaclip_core.recipe_aliases import both_names
from aaclip_core.registry.tracking import resolve_tracking_uri


def check_cross_weight(kind: str, weight: float | None, name: str | None = None) -> Check:
    """``kind`` is 'image' or 'text'. The check keeps the aaclip key as its name; its detail names the
    setting by both the aaclip and the reference/fork name."""
    key = f"cross.{kind}_weight"
    label = both_names(key)
    name = name or key
    if weight is None:
        return Check(name, "skip", None, "not recorded")
    lo, hi = CROSS_WEIGHT_BAND
    fix = f"--set {key}=0.1 (the SPEC §6 default)"
    if not math.isfinite(weight) or weight >= CROSS_WEIGHT_FAIL:
        return Check(name, "fail", weight,
                     f"{label} = {weight:g} >= {CROSS_WEIGHT_FAIL}: the cross-attention takes most of the "
                     f"stage-{2 if kind == 'image' else 1} gradient and starves the adapters (SPEC §6: at 1.0 the "
                     "image adapter kept 37 % of its gradient and the stage-2 loss stayed flat)", fix)
    if not lo <= weight <= hi:
        why = "0 switches the module off in effect" if weight == 0 else "far from the 0.1 the SPEC measured"
        return Check(name, "warn", weight, f"{label} = {weight:g} is outside [{lo}, {hi}] ({why})", fix)
    return Check(name, "pass", weight, f"{label} = {weight:g} within [{lo}, {hi}]")


def check_prompt_names(fidelity: str | None, dataset: str, names: dict[str, str], name: str,
                       legacy: bool = False) -> Check:
    """Whether the classes of a dataset the reference's table covers were (or would be) prompted with
    its names: the reference's numbers, and official fidelity, depend on them."""
    if reference_dataset(dataset) is None:
        return Check(name, "skip", dataset, f"'{dataset}' is not a dataset the reference's name table covers")
    diffs = differences_from_reference(dataset, names)
    if not diffs:
        return Check(name, "pass", 0, f"the reference's names for every {dataset} class")
    shown = "; ".join(f"{c}: '{used}' (reference: '{ref}')" for c, (used, ref) in list(diffs.items())[:3])
    more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    origin = "aaclip's old name table (the run predates recorded prompt names)" if legacy else "non-reference names"
    detail = f"{len(diffs)} {dataset} class(es) prompted with {origin}: {shown}{more}"
    if fidelity != "official":
        return Check(name, "pass", len(diffs), detail + f" (allowed in {fidelity} fidelity; not comparable with the "
                     "reference's numbers)")
    fix = ("train a new run: runs now use the reference's names" if legacy else
           "remove those [prompts.names] entries (and any prompts.table = \"folder\"; `aaclip prompts --dataset "
           f"{dataset} --class CLASS` shows what a class gets)")
    return Check(name, "warn", len(diffs), detail + "; official fidelity is meant to reproduce the reference", fix)


def recipe_prompt_checks(recipe: Recipe) -> list[Check]:
    """The names the recipe gives the table's classes of its training and test datasets."""
    checks = []
    for split in ("train", "test"):
        ref = getattr(recipe.data, split)
        key = reference_dataset(ref.name, ref.layout)
        namer = training_namer(recipe, ref)
        names = {c: namer.resolve(c).name for c in (reference_table().get(key, {}) if key else {})}
        checks.append(check_prompt_names(recipe.fidelity, key or ref.name, names, f"prompt names ({split}: {ref.name})"))
    return checks


def _openai_weights(pretrained: str) -> bool:
    return Recipe.model_validate({"model": {"pretrained": pretrained}}).openai_weights


def check_activation(fidelity: str | None, quick_gelu: bool | None, pretrained: str | None,
                     name: str = "activation (QuickGELU vs fidelity vs weights)") -> Check:
    if fidelity is None or quick_gelu is None or pretrained is None:
        return Check(name, "skip", None, "fidelity, QuickGELU or weights not recorded")
    act = "QuickGELU" if quick_gelu else "GELU"
    openai = _openai_weights(pretrained)
    value = f"{fidelity}/{act}/{'openai' if openai else pretrained}"
    if fidelity == "official" and quick_gelu:
        return Check(name, "fail", value,
                     "fidelity=official reproduces the reference, which ran the OpenAI weights with plain GELU "
                     "(its model config omitted quick_gelu); model.quick_gelu=true departs from it",
                     "--set model.quick_gelu=false (or unset it), or use --set fidelity=corrected")
    if fidelity == "corrected" and openai and not quick_gelu:
        return Check(name, "fail", value,
                     f"fidelity=corrected with OpenAI weights ('{pretrained}') must use QuickGELU, the activation "
                     "those weights were trained with; model.quick_gelu=false runs them with GELU",
                     "unset model.quick_gelu (corrected picks QuickGELU for OpenAI weights) "
                     "or --set model.quick_gelu=true")
    if fidelity == "official" and openai:
        return Check(name, "pass", value,
                     "official: GELU on the OpenAI weights, as the reference did (its config omitted quick_gelu; "
                     "the weights were trained with QuickGELU - fidelity=corrected uses it)")
    if openai:
        return Check(name, "pass", value, "corrected: QuickGELU on the OpenAI weights, as they were trained")
    return Check(name, "pass", value, f"{act} on non-OpenAI weights '{pretrained}' (fidelity {fidelity})")


def _tag_cache(model_name: str, tag: str) -> tuple[bool | None, str]:
    """(cached?, where) for an OpenCLIP pretrained tag, without any download. None: unknown tag."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        return None, ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
    if "file" in cfg:
        return Path(cfg["file"]).is_file(), cfg["file"]
    places = []
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        try:
            from huggingface_hub import try_to_load_from_cache

            for n in names:
                hit = try_to_load_from_cache(repo, n)
                if isinstance(hit, str):
                    return True, hit
        except ImportError:
            pass
        places.append(f"Hugging Face cache ({repo})")
    url = cfg.get("url", "")
    if url:
        target = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if target.is_file():
            return True, str(target)
        places.append(str(target))
    return False, " or ".join(places) or "nowhere"


def check_weights(recipe: Recipe, name: str = "backbone weights") -> Check:
    m = recipe.model
    p = m.pretrained
    kind = weights_kind(p)
    if kind == "random":
        if m.custom_config is not None:
            return Check(name, "pass", p, f"random weights on the custom backbone '{m.name}' (demo/tests; its "
                                          "numbers say nothing about CLIP)")
        return Check(name, "warn", p, f"random weights on {m.name}: results say nothing about CLIP",
                     "--set model.pretrained=openai (or a local open_clip_model.safetensors)")
    path = Path(p).expanduser()
    if kind == "file":
        if path.is_file():
            return Check(name, "pass", str(path), f"weights file exists ({path.stat().st_size / 2**20:.1f} MiB)")
        return Check(name, "fail", str(path), f"model.pretrained = '{p}': no such file",
                     f"put the OpenCLIP weights of {m.name} there, or --set model.pretrained=PATH to the "
                     "open_clip_model.safetensors you have")
    if m.custom_config is not None:
        from aaclip_core.model.backbone import register_custom_config

        register_custom_config(m.name, m.custom_config)
    cached, where = _tag_cache(m.name, p)
    if cached is None:
        return Check(name, "fail", p, f"'{p}' is neither a file nor an OpenCLIP tag of {m.name} (tags: {where})",
                     "--set model.pretrained=PATH to a local weights file, or a valid tag")
    if cached:
        return Check(name, "pass", p, f"tag '{p}' is in the local cache: {where}")
    return Check(name, "warn", p,
                 f"tag '{p}' is not cached ({where}): the first run downloads it and needs the network",
                 "on a machine with network access fetch open_clip_model.safetensors (e.g. Hugging Face "
                 "timm/vit_large_patch14_clip_336.openai), copy it here and --set model.pretrained=PATH")


def check_data(recipe: Recipe, split: str) -> Check:
    from aaclip_core.data import index_dataset, select_classes
    from aaclip_core.training.data import load_samples, synthetic_root_problem

    ref = getattr(recipe.data, split)
    name = f"data.{split}"
    root = Path(ref.root).expanduser()
    fix = f"--set data.{split}.root=PATH (and data.{split}.layout) to where the {ref.name} images are"
    layout = ref.layout
    if layout == "synthetic":
        problem = synthetic_root_problem(root, name)
        if problem:
            return Check(name, "fail", str(root), problem, f'--set {name}.layout="auto"')
        if not root.exists():
            return Check(name, "pass", str(root), f"synthetic demo data: generated on first use at {root}")
        layout = "mvtec"
    try:
        # The messages `train` and `test` would give (the field, what the root must hold, a dataset
        # found one level down), without opening every image.
        samples = load_samples(ref, recipe.runtime.seed, validate=False, field=name)
        labelled = select_classes(index_dataset(root, layout=layout, split="test"), ref.classes)
    except AaclipError as exc:
        return Check(name, "fail", str(root), str(exc), fix)
    classes = sorted({s.class_name for s in labelled})
    found, anomalous = len(labelled), sum(s.label for s in labelled)
    detail = f"{ref.name} at {root}: {found} images ({anomalous} anomalous) in {len(classes)} classes"
    if ref.shot:
        detail += f"; {ref.shot}-shot uses {len(samples)}"
    if anomalous == 0:
        return Check(name, "warn", len(samples), detail + ": no anomalous image, AUROC is undefined", fix)
    return Check(name, "pass", len(samples), detail)


def check_tracking(tracking_uri: str | None) -> Check:
    name = "tracking store"
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.exists():
            if db.parent.is_dir() and os.access(db.parent, os.W_OK):
                return Check(name, "pass", uri, f"{db} does not exist yet; the first run creates it")
            return Check(name, "fail", uri, f"{db.parent} is not a writable folder",
                         "--tracking-uri sqlite:///PATH/mlflow.db in a writable folder")
    from aaclip_core.errors import StoreError
    from aaclip_core.registry.tracking import connect, store_call

    try:
        mlflow = connect(tracking_uri)
        with store_call(mlflow, "listing experiments"):
            n = len(mlflow.MlflowClient().search_experiments(max_results=100))
    except StoreError as exc:
        return Check(name, "fail", uri, str(exc).rstrip("."),
                     "check --tracking-uri / MLFLOW_TRACKING_URI, or unset them to use ./mlflow.db")
    return Check(name, "pass", uri, f"reachable, {n} experiment(s)")


def check_device(recipe: Recipe) -> Check:
    import torch

    from aaclip_core.compute import bf16_supported, select_device

    name = "device / precision"
    prec = recipe.runtime.precision
    try:
        device = select_device(recipe.runtime.device)
    except ConfigError as exc:
        return Check(name, "fail", recipe.runtime.device, str(exc), "--set runtime.device=auto")
    value = f"{device}/{prec}"
    detail = f"torch {torch.__version__} on {device}"
    if device.type == "cuda":
        detail += f" ({torch.cuda.get_device_name(device)})"
        if prec == "bf16" and not torch.cuda.is_bf16_supported():
            return Check(name, "fail", value, detail + ": this GPU has no bf16", "--set runtime.precision=fp32")
        if prec == "fp16":
            return Check(name, "warn", value, detail + ": fp16 autocast without a gradient scaler can underflow",
                         "--set runtime.precision=bf16 (or fp32)")
    elif device.type == "cpu":
        if prec == "fp16":
            return Check(name, "fail", value, detail + ": fp16 needs a GPU", "--set runtime.precision=fp32")
        if prec == "bf16" and not bf16_supported(device):
            return Check(name, "warn", value, detail + ": this CPU has no native bf16 (AVX512-BF16/AMX), so "
                         "bf16 is emulated and slower than fp32", "--set runtime.precision=fp32")
        if recipe.model.custom_config is None:
            return Check(name, "warn", value,
                         detail + f": no GPU visible; {recipe.model.name} at {recipe.model.image_size} px trains very "
                         "slowly on the CPU", "run on a machine with a CUDA GPU (runtime.device=auto picks it)")
    return Check(name, "pass", value, detail)


def static_checks(recipe: Recipe, tracking_uri: str | None, data_splits=("train", "test")) -> list[Check]:
    checks = [
        check_cross_weight("image", recipe.cross.image_weight),
        check_cross_weight("text", recipe.cross.text_weight),
        check_activation(recipe.fidelity, recipe.quick_gelu, recipe.model.pretrained),
        *recipe_prompt_checks(recipe),
        check_weights(recipe),
    ]
    checks += [check_data(recipe, s) for s in data_splits]
    checks += [check_tracking(tracking_uri), check_device(recipe)]
    return checks


