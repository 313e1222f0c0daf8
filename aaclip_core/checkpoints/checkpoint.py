"""Checkpoints: aaclip's own safe format, and the reference ``.pth`` files in and out.

Own format: a directory holding ``adapters.safetensors`` (trainable tensors), optionally
``optimizer.safetensors`` (optimiser tensors), and ``manifest.json`` (config, fidelity, stage,
epoch, loop, backbone id, optimiser metadata). Directories are written under a temporary name and
renamed into place, so an interrupted save never leaves a half-written checkpoint.

Reference files are read with ``torch.load(weights_only=True)``: no pickled code ever runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from aaclip_core.errors import CheckpointError, LocalFileError
from aaclip_core.files import atomic_dir, atomic_path, os_cause, sha256_of, with_umask_mode

# The checkpoint names live with the rest of the run record; re-exported for the rooms that load checkpoints.
from aaclip_core.record import (  # noqa: F401
    FINAL,
    MANIFEST_VERSION,
    STAGE1,
    Manifest,
    checkpoint_name,
    parse_checkpoint_name,
    read_manifest,
)

ADAPTERS = "adapters.safetensors"
OPTIMIZER = "optimizer.safetensors"
MANIFEST = "manifest.json"
# What loading a checkpoint's weights needs; optimiser and random states are for resuming only.
CHECKPOINT_CORE_FILES = (ADAPTERS, MANIFEST)



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
    # Named optimiser states (a job with one optimiser per parameter group) and extra tensors
    # such as random-number-generator states, for resuming exactly.
    optimizers: dict[str, dict] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def info(self) -> Manifest:
        """The manifest, typed (``manifest`` is its JSON form, as read)."""
        return read_manifest(self.manifest)


EXTRA = "state.safetensors"


def _optimizer_file(name: str) -> str:
    return OPTIMIZER if name == "default" else f"optimizer-{name}.safetensors"


def save_checkpoint(
    directory: Path,
    adapters: dict[str, torch.Tensor],
    manifest: dict[str, Any] | Manifest,
    optimizer_state: dict | None = None,
    optimizers: dict[str, dict] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint directory atomically. ``optimizer_state`` is one optimiser's state;
    ``optimizers`` names several; ``extra_tensors`` holds anything else needed to resume."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    named = dict(optimizers or {})
    if optimizer_state is not None:
        named["default"] = optimizer_state
    with _writing(directory), atomic_dir(directory) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in adapters.items()}, str(tmp / ADAPTERS))
        info = replace(read_manifest(manifest), format_version=MANIFEST_VERSION)
        if named:
            info.optimizers = {}
            for name, state in named.items():
                tensors, meta = _flatten_optimizer(state)
                save_file(tensors, str(tmp / _optimizer_file(name)))
                info.optimizers[name] = meta
        if extra_tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()}, str(tmp / EXTRA))
        (tmp / MANIFEST).write_text(json.dumps(info.as_dict(), indent=2, sort_keys=True), encoding="utf-8")
        for f in tmp.iterdir():
            with_umask_mode(f)
    return directory


# safetensors writes from Rust: an I/O failure arrives as a SafetensorError whose text ends "(os error 28)".
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


@contextlib.contextmanager
def _writing(directory: Path) -> Iterator[None]:
    """A checkpoint that cannot be written (a full disk or temporary folder, a file-size limit, no
    permission) is one paragraph naming the folder and the operating system's cause; ``atomic_dir``
    has already removed what the failed write left."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        cause = exc if isinstance(exc, OSError) else _as_os_error(exc)
        why = os_cause(cause) if cause is not None else " ".join(str(exc).split())
        raise LocalFileError(
            f"Cannot write the checkpoint {directory}: {why}. Nothing half-written was left there. Free space on "
            f"that disk (a job writes its checkpoints in the temporary folder first: set TMPDIR to a folder on a "
            "disk with room) and run again."
        ) from None


def _as_os_error(exc: SafetensorError) -> OSError | None:
    found = _OS_ERROR.search(str(exc))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


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
        optimizers = {}
        if with_optimizer:
            for name, meta in (read_manifest(manifest).optimizers or {}).items():
                optimizers[name] = _unflatten_optimizer(load_file(str(directory / _optimizer_file(name))), meta)
        extra = load_file(str(directory / EXTRA)) if (directory / EXTRA).is_file() else {}
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise CheckpointError(
            f"Checkpoint '{directory}' cannot be read ({exc}); it may be truncated or corrupt. Re-download it "
            "from the run's artifacts or use another checkpoint (--checkpoint)."
        ) from None
    return Checkpoint(
        adapters=adapters, manifest=manifest, optimizer=optimizers.get("default"), optimizers=optimizers, extra=extra
    )


# ------------------------------------------------------------------------------------------ reference


def _resave_hint(path: Path, kind: str | None) -> str:
    """One shell line that re-saves a trusted reference file with tensors only."""
    if kind:
        k = f"{kind}_adapter"
        body = f"{{'{k}': {{n: t.cpu() for n, t in o['{k}'].items()}}, 'epoch': int(o['epoch'])}}"
    else:
        body = "{k: o[k] for k in ('text_adapter', 'image_adapter', 'epoch') if k in o}"
    safe = path.with_name(f"{path.stem}.safe{path.suffix or '.pth'}")
    return (
        f"python -c \"import torch; o = torch.load('{path}', map_location='cpu', weights_only=False); "
        f"torch.save({body}, '{safe}')\""
    )


def _load_reference(path: Path, kind: str | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Reference checkpoint '{path}' does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"'{path}' needs pickle to load (it holds Python objects, not only tensors), so it was "
            "refused without being run. Only if you trust where it came from (loading it runs its "
            f"code), re-save it with tensors only: {_resave_hint(path, kind)} and import the new file."
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
                f"'{source}': key '{k[len(prefix):]}' has the wrong shape: expected {tuple(own[k].shape)}, "
                f"found {tuple(v.shape)}. Use the recipe (model.name) the file was trained with."
            )
    missing = sorted(wanted - set(mapped))
    if missing:
        more = f" (and {len(missing) - 1} more keys)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"'{source}' lacks '{missing[0][len(prefix):]}'{more} that the recipe's model needs; "
            "check model.relu, text_adapt_until, image_adapt_until and levels."
        )


def _relu_variants(keys: list[str]) -> set[bool]:
    """The projection variants present: True for ``fc.0.weight`` (relu), False for ``fc.weight``."""
    return {".fc.0." in k for k in keys if k.startswith(("seg_proj.", "det_proj."))}


@dataclass
class ReferenceFile:
    """A reference adapter file read safely: its adapter state, recorded epoch and provenance."""

    path: Path
    kind: str  # "text" or "image"
    state: dict[str, torch.Tensor]
    epoch: int | None
    sha256: str
    relu: bool | None  # image files: the projection variant; None for text files
    extra_keys: list[str]  # entries besides the adapter state and the epoch (e.g. the optimiser)


def read_reference(path: Path, kind: str) -> ReferenceFile:
    """Read a reference ``text_adapter.pth`` (kind "text") or ``image_adapter_N.pth`` (kind
    "image") with ``weights_only=True``; refuse files that are not adapter files of that kind."""
    if kind not in ("text", "image"):
        raise ValueError(f"kind must be 'text' or 'image', not {kind!r}")
    path = Path(path)
    obj = _load_reference(path, kind)
    key = f"{kind}_adapter"
    if key not in obj or not isinstance(obj[key], dict):
        other = "image" if kind == "text" else "text"
        hint = f" It looks like a reference {other} adapter file." if f"{other}_adapter" in obj else ""
        raise CheckpointError(
            f"'{path}' has no '{key}' entry (found: {', '.join(map(str, obj)) or 'nothing'}); is it a "
            f"reference {kind} adapter file?{hint}"
        )
    state = {}
    for k, v in obj[key].items():
        if not torch.is_tensor(v):
            raise CheckpointError(f"'{path}': '{key}' entry '{k}' is a {type(v).__name__}, not a tensor.")
        if not v.is_floating_point():
            raise CheckpointError(f"'{path}': key '{k}' holds {v.dtype} values, not floating-point weights.")
        state[str(k)] = v
    relu = None
    if kind == "image":
        variants = _relu_variants(list(state))
        if len(variants) > 1:
            raise CheckpointError(
                f"'{path}' mixes both projection variants ('seg_proj.N.fc.weight' and "
                "'seg_proj.N.fc.0.weight'); it is not a file the reference code writes."
            )
        relu = next(iter(variants)) if variants else None
    epoch = obj.get("epoch")
    if torch.is_tensor(epoch) and epoch.numel() == 1:
        epoch = epoch.item()
    return ReferenceFile(
        path=path,
        kind=kind,
        state=state,
        epoch=int(epoch) if isinstance(epoch, (int, float)) and not isinstance(epoch, bool) else None,
        sha256=sha256_of(path),
        relu=relu,
        extra_keys=sorted(str(k) for k in obj if k not in (key, "epoch")),
    )


def map_reference(ref: ReferenceFile, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors under this model's adapter keys (float32, values unchanged), refusing any
    key the model lacks, any key it misses, and any shape that differs (named with both shapes)."""
    key = f"{ref.kind}_adapter"
    mapped = {f"{key}.{k}": v.float() for k, v in ref.state.items()}
    _check_shapes(ref.path, mapped, own, f"{key}.")
    return mapped


@dataclass
class ReferenceImport:
    adapters: dict[str, torch.Tensor]
    epoch: int | None
    sha256: str
    relu: bool | None = None


def import_reference(path: Path, kind: str, own: dict[str, torch.Tensor], relu: bool) -> ReferenceImport:
    """Map a reference ``text_adapter.pth`` (kind "text") or ``image_adapter_N.pth`` (kind "image")
    onto this model's adapter keys, refusing any shape or key that does not fit (including a
    projection variant other than ``relu``)."""
    ref = read_reference(path, kind)
    if ref.relu is not None and ref.relu != relu:
        raise CheckpointError(
            f"'{ref.path}' was trained with relu={'on' if ref.relu else 'off'} projections (keys "
            f"'seg_proj.N.fc{'.0' if ref.relu else ''}.weight') but the recipe has model.relu = "
            f"{str(relu).lower()}; pass --set model.relu={str(ref.relu).lower()}."
        )
    return ReferenceImport(adapters=map_reference(ref, own), epoch=ref.epoch, sha256=ref.sha256, relu=ref.relu)


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
        with atomic_path(target) as tmp:
            torch.save({f"{kind}_adapter": state, "epoch": epoch}, tmp)
        written.append(target)
    return written
