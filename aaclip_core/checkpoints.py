"""Checkpoints: aaclip's own safe format, and the reference ``.pth`` files in and out.

Own format: a directory holding ``adapters.safetensors`` (trainable tensors), optionally
``optimizer.safetensors`` (optimiser tensors), and ``manifest.json`` (config, fidelity, stage,
epoch, loop, backbone id, optimiser metadata). Directories are written under a temporary name and
renamed into place, so an interrupted save never leaves a half-written checkpoint.

Reference files are read with ``torch.load(weights_only=True)``: no pickled code ever runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

FORMAT_VERSION = 1
ADAPTERS = "adapters.safetensors"
OPTIMIZER = "optimizer.safetensors"
MANIFEST = "manifest.json"


# ------------------------------------------------------------------------------------------ atomic IO


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _replace_dir(tmp: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------ optimiser


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, pstate in state["state"].items():
        scalars = {}
        for k, v in pstate.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[k] = v
        meta["state"][str(pid)] = scalars
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(pid): dict(scalars) for pid, scalars in meta["state"].items()}
    for key, t in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = t
    return {"state": state, "param_groups": meta["param_groups"]}


# ------------------------------------------------------------------------------------------ own format


@dataclass
class Checkpoint:
    adapters: dict[str, torch.Tensor]
    manifest: dict[str, Any]
    optimizer: dict | None = None


def save_checkpoint(
    directory: Path,
    adapters: dict[str, torch.Tensor],
    manifest: dict[str, Any],
    optimizer_state: dict | None = None,
) -> Path:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in adapters.items()}, str(tmp / ADAPTERS))
        manifest = {"format_version": FORMAT_VERSION, **manifest}
        if optimizer_state is not None:
            tensors, meta = _flatten_optimizer(optimizer_state)
            save_file(tensors, str(tmp / OPTIMIZER))
            manifest["optimizer"] = meta
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_checkpoint(directory: Path, with_optimizer: bool = False) -> Checkpoint:
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file() or not (directory / ADAPTERS).is_file():
        raise CheckpointError(
            f"'{directory}' is not an aaclip checkpoint (it needs {ADAPTERS} and {MANIFEST}). Pass the "
            "checkpoint directory of a run, or import reference files with `aaclip import`."
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        adapters = load_file(str(directory / ADAPTERS))
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"Checkpoint '{directory}' cannot be read: {exc}.") from None
    optimizer = None
    if with_optimizer and (directory / OPTIMIZER).is_file() and "optimizer" in manifest:
        optimizer = _unflatten_optimizer(load_file(str(directory / OPTIMIZER)), manifest["optimizer"])
    return Checkpoint(adapters=adapters, manifest=manifest, optimizer=optimizer)


# ------------------------------------------------------------------------------------------ reference


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_reference(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"Reference checkpoint '{path}' does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"'{path}' needs pickle to load (it holds Python objects, not only tensors), so it was "
            "refused without being run. If you trust it, re-save it with tensors only: "
            "`torch.save({k: v for k, v in torch.load(p, weights_only=False).items()}, p2)` keeping "
            "the state dicts and the epoch."
        ) from None
    except Exception as exc:
        raise CheckpointError(f"'{path}' is not a readable PyTorch file: {exc}.") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"'{path}' holds a {type(obj).__name__}, not a checkpoint dictionary.")
    return obj


def _check_shapes(source: Path, mapped: dict[str, torch.Tensor], own: dict[str, torch.Tensor], prefix: str) -> None:
    wanted = {k for k in own if k.startswith(prefix)}
    for k, v in mapped.items():
        if k not in own:
            raise CheckpointError(
                f"'{source}' has key '{k[len(prefix):]}' that the recipe's model does not have "
                f"(model.relu, text_adapt_until, image_adapt_until and levels must match the file)."
            )
        if own[k].shape != v.shape:
            raise CheckpointError(
                f"'{source}': key '{k[len(prefix):]}' has shape {tuple(v.shape)}, the recipe's backbone "
                f"expects {tuple(own[k].shape)}. Use the recipe (model.name) the file was trained with."
            )
    missing = sorted(wanted - set(mapped))
    if missing:
        raise CheckpointError(
            f"'{source}' lacks '{missing[0][len(prefix):]}' (and {len(missing) - 1} more keys) that the "
            "recipe's model needs; check model.relu, text_adapt_until, image_adapt_until and levels."
        )


def _relu_of_file(keys: list[str]) -> bool | None:
    proj = [k for k in keys if k.startswith(("seg_proj.", "det_proj."))]
    if not proj:
        return None
    return any(".fc.0." in k for k in proj)


@dataclass
class ReferenceImport:
    adapters: dict[str, torch.Tensor]
    epoch: int | None
    sha256: str
    relu: bool | None = None


def import_reference(path: Path, kind: str, own: dict[str, torch.Tensor], relu: bool) -> ReferenceImport:
    """Map a reference ``text_adapter.pth`` (kind "text") or ``image_adapter_N.pth`` (kind "image")
    onto this model's adapter keys, refusing any shape or key that does not fit."""
    path = Path(path)
    obj = _load_reference(path)
    key = f"{kind}_adapter"
    if key not in obj or not isinstance(obj[key], dict):
        raise CheckpointError(
            f"'{path}' has no '{key}' entry (found: {', '.join(map(str, obj)) or 'nothing'}); is it a "
            f"reference {kind} adapter file?"
        )
    state = obj[key]
    if kind == "image":
        file_relu = _relu_of_file(list(state))
        if file_relu is not None and file_relu != relu:
            raise CheckpointError(
                f"'{path}' was trained with relu={'on' if file_relu else 'off'} projections (keys "
                f"'seg_proj.N.fc{'.0' if file_relu else ''}.weight') but the recipe has model.relu = "
                f"{str(relu).lower()}; pass --set model.relu={str(file_relu).lower()}."
            )
    mapped = {f"{key}.{k}": v.float() for k, v in state.items() if torch.is_tensor(v)}
    _check_shapes(path, mapped, own, f"{key}.")
    epoch = obj.get("epoch")
    return ReferenceImport(
        adapters=mapped,
        epoch=int(epoch) if isinstance(epoch, (int, float)) else None,
        sha256=sha256_of(path),
        relu=_relu_of_file(list(state)) if kind == "image" else None,
    )


def export_reference(adapters: dict[str, torch.Tensor], directory: Path, text_epoch: int, image_epoch: int) -> list[Path]:
    """Write ``text_adapter.pth`` and ``image_adapter_{epoch}.pth`` in the reference layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, epoch, name in (
        ("text", text_epoch, "text_adapter.pth"),
        ("image", image_epoch, f"image_adapter_{image_epoch}.pth"),
    ):
        prefix = f"{kind}_adapter."
        state = {k[len(prefix):]: v.clone() for k, v in adapters.items() if k.startswith(prefix)}
        target = directory / name
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save({f"{kind}_adapter": state, "epoch": epoch}, tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written.append(target)
    return written
