"""Recipes: every setting of a run as validated data.

A recipe is a TOML file whose tables mirror :class:`Recipe`. Every field has a default and a check;
unknown keys are refused so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from aaclip_core.errors import ConfigError
from aaclip_core.files import not_utf8
from aaclip_core.names import METRIC_NAMES, PIXEL_AUROC, RECIPE_LAYOUTS
from aaclip_core.recipe_aliases import Alias, aliases

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

# An installed wheel carries the recipes as aaclip_core/recipes (pyproject maps the top-level
# recipes/ folder there); a source checkout has only the top-level folder.
_INSTALLED_RECIPES = Path(__file__).resolve().parent / "recipes"
RECIPE_DIR = _INSTALLED_RECIPES if _INSTALLED_RECIPES.is_dir() else Path(__file__).resolve().parent.parent / "recipes"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The frozen OpenCLIP backbone and the adapters placed on it (SPEC §1-2)."""

    name: str = "ViT-L-14-336"
    # An OpenCLIP pretrained tag ("openai"), a local weights file, or "none" for random weights.
    pretrained: str = "openai"
    image_size: int = Field(518, ge=32, le=2048)
    # None: decided by fidelity (official runs the OpenAI weights with plain GELU, as the reference did).
    quick_gelu: bool | None = None
    text_adapt_until: int = Field(3, ge=0)
    image_adapt_until: int = Field(6, ge=0)
    text_adapt_weight: float = Field(0.1, ge=0.0, le=1.0)
    image_adapt_weight: float = Field(0.1, ge=0.0, le=1.0)
    levels: list[int] = Field(default_factory=lambda: [6, 12, 18, 24], min_length=1)
    relu: bool = False
    # DPAM replaces attention in the last (surgery_until_layer - 1) vision blocks of the stage-1 copy.
    surgery_until_layer: int = Field(20, ge=1)
    # An OpenCLIP model config (the JSON's content) registered under `name` at run time: how the
    # tiny test backbone is defined without shipping weights.
    custom_config: dict[str, Any] | None = None

    @field_validator("levels")
    @classmethod
    def _levels_increasing(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:])) or v[0] < 1:
            raise ValueError("levels must be strictly increasing block numbers starting at 1 or more")
        return v


class DatasetRef(_Strict):
    """Where a dataset lives and how to read it."""

    name: str = "VisA"  # selects the prompt-name table (with layout) and is used for tags
    root: str = "data/VisA"
    layout: Literal[RECIPE_LAYOUTS] = "auto"
    classes: list[str] | None = None  # None = every class found
    # Aux-shot k of AA-CLIP: k labelled images per class (half normal, half anomalous); 0 = all.
    shot: int = Field(0, ge=0)


class DataConfig(_Strict):
    train: DatasetRef = Field(default_factory=DatasetRef)
    test: DatasetRef = Field(
        default_factory=lambda: DatasetRef(name="MVTec", root="data/mvtec_anomaly_detection")
    )
    domain: Literal["industrial", "medical"] = "industrial"
    cache_images: bool = True
    num_workers: int = Field(0, ge=0)
    # Zero-shot protocol: training and testing on the same dataset must be declared.
    allow_same_dataset: bool = False


class PromptsConfig(_Strict):
    """The class name put into each class's 16 prompt sentences (SPEC §2)."""

    # "reference": the reference's descriptive names (shipped table) for the datasets and classes it
    # has; "folder": plain folder names. A class without a name uses its folder name, "_" -> " ".
    table: Literal["reference", "folder"] = "reference"
    # Class folder name -> prompt name, for your own classes or to override the table.
    names: dict[str, str] = Field(default_factory=dict)

    @field_validator("names")
    @classmethod
    def _names_not_blank(cls, v: dict[str, str]) -> dict[str, str]:
        blank = [k for k, name in v.items() if not name.strip()]
        if blank:
            raise ValueError(f"prompt name of class '{blank[0]}' is empty; give a name or drop the entry")
        return v


class Stage1Config(_Strict):
    """Text-anchor training (SPEC §3)."""

    epochs: int = Field(5, ge=0)
    lr: float = Field(1e-5, gt=0)
    batch_size: int = Field(16, ge=1)
    betas: tuple[float, float] = (0.5, 0.999)
    text_norm_weight: float = Field(0.1, ge=0)


class Stage2Config(_Strict):
    """Patch-alignment training (SPEC §4)."""

    epochs: int = Field(20, ge=0)
    lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(2, ge=1)
    betas: tuple[float, float] = (0.5, 0.999)
    milestones: list[int] = Field(default_factory=lambda: [16000, 32000])  # optimiser steps
    gamma: float = Field(0.5, gt=0, le=1)


class CrossAttentionConfig(_Strict):
    """Cross-attention between the adapters (SPEC §6)."""

    text_weight: float = Field(0.1, ge=0.0)
    image_weight: float = Field(0.1, ge=0.0)
    heads: int = Field(8, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    learnable_weight: bool = False


class FeedbackConfig(_Strict):
    """Feedback training, the improved (v2) schedule (SPEC §7)."""

    loops: int = Field(5, ge=1, le=10)
    text_epochs_per_loop: int = Field(5, ge=1)
    image_epochs_per_loop: int = Field(15, ge=1)
    epochs_decay_rate: float = Field(0.8, gt=0, le=1)
    lr_decay_per_loop: float = Field(0.8, gt=0, le=1)
    text_lr: float = Field(2e-5, gt=0)
    image_lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_epochs: int = Field(2, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    cross_attn_start_loop: int = Field(1, ge=1)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    # Below this many validation images the held-out metrics are too coarse to select a loop on:
    # the job and `doctor` warn.
    min_val_images: int = Field(30, ge=0)
    # The held-out metric that selects the loop (aaclip_core.evaluation.selection): one of the reported metrics.
    selection_metric: Literal[METRIC_NAMES] = PIXEL_AUROC


class EvalConfig(_Strict):
    batch_size: int = Field(8, ge=1)
    aupro: bool = True
    # AUPRO thresholds: 0 = exact (every distinct score); a number = that many evenly spaced thresholds.
    aupro_thresholds: int = Field(0, ge=0)
    # Store per-class pixel pair counts so `compare` can bootstrap pixel AUROC over test images
    # (exact; costs ~10-25 s per 100 images at 518 px on a CPU, far less on a GPU).
    pixel_pairs: bool = True


class RuntimeConfig(_Strict):
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N" | "mps"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 111
    threads: int = Field(0, ge=0)  # 0 = torch's default
    # torch.compile the adapted image forward (training, test, predict); same results within float
    # tolerance, a one-off compile cost per input shape, then faster steps. Test and predict, whose
    # weights no longer change, compile them in as constants (faster on CPU, not for training).
    compile: bool = False


class TrackingConfig(_Strict):
    experiment: str = "aaclip"


class SweepRange(_Strict):
    """A numeric range of one setting in a sweep's search space: ``{ low, high, log, step }``."""

    low: int | float
    high: int | float
    log: bool = False  # sample on a log scale (low must be above 0; no step)
    step: int | float | None = None  # sample on a grid low, low + step, ... (no log)

    @model_validator(mode="after")
    def _not_empty(self) -> SweepRange:
        if not self.low < self.high:
            raise ValueError(f"the range is empty (low = {self.low} is not below high = {self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log = true needs low above 0 (low = {self.low})")
        if self.log and self.step is not None:
            raise ValueError("log = true and a step cannot be combined (Optuna samples one or the other)")
        if self.step is not None and not 0 < self.step <= self.high - self.low:
            raise ValueError(f"step = {self.step} must be above 0 and at most high - low")
        return self

    @property
    def is_int(self) -> bool:
        return all(isinstance(v, int) for v in (self.low, self.high, self.step or 1))


SWEEP_TRAININGS = ("base", "cross", "feedback")
SWEEP_SAMPLERS = ("tpe", "random", "grid")
SWEEP_PRUNERS = ("median", "successive-halving", "none")


class SweepConfig(_Strict):
    """A hyperparameter search (``aaclip sweep``): each trial trains the recipe with settings drawn
    from ``space`` and is scored on the held-out validation split of its training data, never on
    ``data.test``. ``space`` keys are setting names (``stage2.lr``) or the reference's/fork's names
    (``image_cross_attn_weight``); a value is a range ``{ low, high, log, step }`` or a list of choices."""

    trials: int = Field(20, ge=1, le=10000)  # trials that end with a result (finished or pruned)
    train: Literal[SWEEP_TRAININGS] = "feedback"  # what each trial trains (cross needs from_run)
    from_run: str | None = None  # cross trials: the base run they start from
    sampler: Literal[SWEEP_SAMPLERS] = "tpe"
    # None: runtime.seed. Seeds the sampler (a study joined by several workers is not reproducible).
    seed: int | None = None
    pruner: Literal[SWEEP_PRUNERS] = "median"
    # Trials that finish before the pruner may stop any, and loops a feedback trial runs before it may be stopped.
    pruner_startup_trials: int = Field(2, ge=0)
    pruner_warmup_loops: int = Field(0, ge=0)
    # A held-out validation metric (maximised): one of the reported metrics.
    objective: Literal[METRIC_NAMES] = PIXEL_AUROC
    # A worker proves it is alive this often; its trial counts as dead (FAILED) after grace_seconds without it.
    heartbeat_seconds: int = Field(30, ge=1)
    grace_seconds: int = Field(120, ge=2)
    space: dict[str, SweepRange | list[Any]] = Field(default_factory=dict)

    @field_validator("space", mode="before")
    @classmethod
    def _dimensions(cls, v: Any) -> Any:
        """Each value a range table or a list of choices; a bad one is named by its key."""
        if not isinstance(v, dict):
            return v
        out: dict[str, SweepRange | list[Any]] = {}
        for key, dim in v.items():
            if isinstance(dim, list):
                if not dim:
                    raise ValueError(f"sweep.space '{key}' has an empty list of choices")
                out[key] = dim
            elif isinstance(dim, (dict, SweepRange)):
                try:
                    out[key] = dim if isinstance(dim, SweepRange) else SweepRange.model_validate(dim)
                except ValidationError as exc:
                    first = exc.errors()[0]
                    where = ".".join(str(p) for p in first["loc"])
                    msg = first["msg"].removeprefix("Value error, ")
                    raise ValueError(f"sweep.space '{key}'{f' {where}' if where else ''}: {msg}") from None
            else:
                raise ValueError(f"sweep.space '{key}' must be a range {{ low = ..., high = ... }} or a list of "
                                 f"choices, not {dim!r}")
        return out

    @model_validator(mode="after")
    def _consistent(self) -> SweepConfig:
        if self.grace_seconds <= self.heartbeat_seconds:
            raise ValueError(f"sweep.grace_seconds ({self.grace_seconds}) must exceed sweep.heartbeat_seconds "
                             f"({self.heartbeat_seconds}), or a live worker's trial would be failed")
        if self.train == "cross" and not self.from_run:
            raise ValueError("sweep.train = 'cross' needs sweep.from_run, the base run the cross trials start from")
        return self


class Recipe(_Strict):
    name: str = "custom"
    extends: str | None = None  # the recipe this one was layered on (resolved at load time)
    description: str = ""
    fidelity: Literal["official", "corrected"] = "official"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    stage1: Stage1Config = Field(default_factory=Stage1Config)
    stage2: Stage2Config = Field(default_factory=Stage2Config)
    cross: CrossAttentionConfig = Field(default_factory=CrossAttentionConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    # `aaclip sweep`'s search; None (the default) for a recipe that is not a sweep.
    sweep: SweepConfig | None = None
    # Dotted keys the recipe file itself or --set states (not those it takes through `extends`);
    # None for a recipe built in code. A run derived from another (`--from`) keeps these and takes
    # the parent's data and model settings for the rest.
    _stated: frozenset[str] | None = PrivateAttr(default=None)

    @property
    def stated_keys(self) -> frozenset[str] | None:
        return self._stated

    @model_serializer(mode="wrap")
    def _without_absent_sweep(self, handler) -> dict[str, Any]:
        # A recipe that is not a sweep dumps as it did before sweeps existed: same params, same hash.
        data = handler(self)
        if self.sweep is None:
            data.pop("sweep", None)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.sweep is not None:
            check_sweep_space(self)
        m = self.model
        if m.custom_config is not None:
            layers = m.custom_config.get("vision_cfg", {}).get("layers")
            text_layers = m.custom_config.get("text_cfg", {}).get("layers")
            if isinstance(layers, int):
                _check_depth("model.levels", max(m.levels), layers)
                _check_depth("model.image_adapt_until", m.image_adapt_until, layers)
                _check_depth("model.surgery_until_layer", m.surgery_until_layer - 1, layers)
            if isinstance(text_layers, int):
                _check_depth("model.text_adapt_until", m.text_adapt_until, text_layers)
        return self

    @property
    def openai_weights(self) -> bool:
        """Whether the backbone weights are OpenAI's: the tag, or a local file whose name or folder
        says so (as the Hugging Face copies do, e.g. ``vit_large_patch14_clip_336.openai``)."""
        p = self.model.pretrained
        return p == "openai" or ("/" in p or p.endswith((".safetensors", ".bin", ".pt", ".pth"))) and "openai" in p.lower()

    @property
    def quick_gelu(self) -> bool:
        """The activation actually used: explicit setting, else what the fidelity mode implies
        (official reproduces the reference's plain GELU; corrected uses QuickGELU for OpenAI weights)."""
        if self.model.quick_gelu is not None:
            return self.model.quick_gelu
        return self.fidelity == "corrected" and self.openai_weights


def require_sweep(recipe: Recipe) -> SweepConfig:
    """The recipe's [sweep], or one paragraph saying it has none."""
    if recipe.sweep is None:
        raise ConfigError(
            f"Recipe '{recipe.name}' has no [sweep] section, so there is nothing to search. Add one (trials, sampler, "
            "objective and [sweep.space]; `aaclip recipes show sweep-demo` shows one) or use a recipe that has it."
        )
    return recipe.sweep


def sweep_settings(key: str) -> tuple[str, ...]:
    """The settings a ``sweep.space`` key sets: itself, or those a reference/fork name stands for."""
    alias = aliases().get(key)
    return alias.settings if alias is not None and alias.settings else (key,)


def with_settings(recipe: Recipe, values: dict[str, Any]) -> Recipe:
    """``recipe`` with settings (dotted keys or reference/fork names) replaced, validated, its
    ``sweep`` dropped: one trial's recipe. Raises ValidationError for a value the setting refuses."""
    data = recipe.model_dump(mode="python", exclude={"sweep"})
    for key, value in values.items():
        for setting in sweep_settings(key):
            node = data
            *parents, leaf = setting.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
    return Recipe.model_validate(data)


def _sweep_problem(key: str, exc: ValidationError, value: Any) -> str:
    first = exc.errors()[0]
    return f"sweep.space '{key}': the value {value!r} is refused by the setting ({first['msg']})"


def check_sweep_space(recipe: Recipe) -> None:
    """Every ``sweep.space`` key names a setting (or a reference/fork name of one) that holds a single
    value, and every end of a range and every choice is a value that setting accepts (the right type,
    inside its bounds). Raises ValueError naming the key."""
    plain = flatten(recipe.model_copy(update={"sweep": None}))
    for key, dim in recipe.sweep.space.items():
        alias = aliases().get(key)
        if alias is not None and not alias.settings:
            raise ValueError(f"sweep.space '{key}': the reference/fork setting '{key}' has no aaclip counterpart: "
                             f"{alias.instead}")
        for setting in sweep_settings(key):
            if setting not in plain or setting.startswith("sweep."):
                raise ValueError(f"sweep.space '{key}' is not a setting (`aaclip recipes show NAME` lists every "
                                 "setting; `--aliases` the reference/fork names)")
        values = [dim.low, dim.high] if isinstance(dim, SweepRange) else list(dim)
        if isinstance(dim, SweepRange):
            current = recipe.model_dump(mode="python")
            for part in sweep_settings(key)[0].split("."):
                current = current[part]
            if isinstance(current, bool) or not isinstance(current, (int, float)):
                raise ValueError(f"sweep.space '{key}': a range needs a numeric setting, and this one holds "
                                 f"{type(current).__name__} values; give a list of choices instead")
            if isinstance(current, int) and not dim.is_int:
                raise ValueError(f"sweep.space '{key}' is a whole-number setting: give low, high and step as "
                                 "whole numbers")
        for value in values:
            try:
                trial = with_settings(recipe, {key: value})
            except ValidationError as exc:
                raise ValueError(_sweep_problem(key, exc, value)) from None
            got = flatten(trial)[sweep_settings(key)[0]]
            if isinstance(dim, list) and got != str(value) and not (isinstance(value, (int, float))
                                                                    and not isinstance(value, bool)
                                                                    and _same_number(got, value)):
                raise ValueError(f"sweep.space '{key}': the choice {value!r} is of the wrong type for the setting "
                                 f"(it would be read as {got})")


def _same_number(text: str, value: float) -> bool:
    try:
        return float(text) == float(value)
    except ValueError:
        return False


def _check_depth(field: str, value: int, layers: int) -> None:
    if value > layers:
        raise ValueError(f"{field} = {value} exceeds the backbone's {layers} vision/text blocks")


# --------------------------------------------------------------------------------------------------
# Loading


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def resolve_recipe_path(name_or_path: str) -> Path:
    """A shipped recipe name (``demo``) or a path to a TOML file."""
    candidate = Path(name_or_path).expanduser()
    # A folder that happens to share a recipe's name must not hide the shipped recipe.
    if candidate.suffix == ".toml" or candidate.is_file():
        if not candidate.is_file():
            raise ConfigError(
                f"Recipe file '{candidate}' does not exist. Pass a shipped recipe name "
                f"({', '.join(shipped_recipes())}) or the path of a TOML file."
            )
        return candidate
    shipped = RECIPE_DIR / f"{name_or_path}.toml"
    if not shipped.is_file():
        raise ConfigError(
            f"Unknown recipe '{name_or_path}' (--recipe). Shipped recipes: "
            f"{', '.join(shipped_recipes())}; or pass the path of a TOML file."
        )
    return shipped


# `--set key=null`: TOML has no null, so a bare `null` drops the key and the field takes its
# built-in default (null for the optional fields); `--set 'key="null"'` is the string "null".
RESET_TO_DEFAULT = "null"
_RESET = object()


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with the value read as a TOML literal (so 0.1, true, [1,2], "x" work);
    anything that is not valid TOML is taken as a plain string; ``null`` resets the field."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}' is not of the form key=value (e.g. --set stage2.epochs=3).")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if not key:
        raise ConfigError(f"--set '{text}' has an empty key.")
    if raw == RESET_TO_DEFAULT:
        return key, _RESET
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def translate_override(text: str) -> tuple[list[str], Alias | None]:
    """``OLD_NAME=value`` (a reference/fork setting name) -> the same value for the aaclip
    setting(s) it is, and the alias used; anything else unchanged. Names without a counterpart are
    left for `apply_overrides` to refuse."""
    key, sep, raw = text.partition("=")
    alias = aliases().get(key.strip()) if sep else None
    if alias is None or not alias.settings:
        return [text], None
    return [f"{setting}={raw}" for setting in alias.settings], alias


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for given in overrides:
        for text in translate_override(given)[0]:
            _apply_override(data, text)
    return data


def _apply_override(data: dict[str, Any], text: str) -> None:
    key, value = parse_override(text)
    alias = aliases().get(key)
    if alias is not None and not alias.settings:
        raise ConfigError(f"--set {key}: the reference/fork setting '{key}' has no aaclip counterpart: {alias.instead}.")
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is a value, not a table.")
        node = child
    if value is _RESET:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value


def _unknown_key(loc: str) -> str:
    """Why a key is unknown: most often a reference/fork name, or a typo."""
    alias = aliases().get(loc.rsplit(".", 1)[-1])
    if alias is None:
        return "unknown key (`aaclip recipes show NAME --aliases` lists the reference/fork names --set accepts)"
    if not alias.settings:
        return f"unknown key: the reference/fork setting '{alias.old}' has no aaclip counterpart: {alias.instead}"
    return f"unknown key: '{alias.old}' is the reference/fork name of {' and '.join(alias.settings)}; write that"


def recipe_from_dict(data: dict[str, Any], source: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = _unknown_key(loc) if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            problems.append(f"'{loc}': {msg}" if loc else msg)
        raise ConfigError(
            f"Recipe {source} is invalid: {'; '.join(problems)}. Fix the key in the file or with "
            f"--set key=value; `aaclip recipes show NAME` prints every valid key with its default."
        ) from None


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_layered(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe's table, layered over the recipe it ``extends`` (a shipped name or a path relative
    to it), so variants such as ``cross-demo`` state only what differs."""
    if path in seen:
        raise ConfigError(f"Recipe '{path}' extends itself through {' -> '.join(map(str, seen))}.")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Recipe file '{path}' is not valid TOML: {exc}.") from None
    except OSError as exc:
        raise ConfigError(f"Recipe file '{path}' cannot be read: {exc.strerror}.") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"Recipe file '{path}' cannot be read: {not_utf8(exc)}. A recipe is a TOML text file; save it as UTF-8."
        ) from None
    parent = data.get("extends")
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"Recipe '{path}': 'extends' must be a recipe name or path.")
    relative = path.parent / parent
    try:
        parent_path = relative if relative.suffix == ".toml" and relative.is_file() else resolve_recipe_path(parent)
    except ConfigError:
        raise ConfigError(
            f"Recipe '{path}' extends '{parent}', which is neither a TOML file relative to it ({relative}) nor a "
            f"shipped recipe ({', '.join(shipped_recipes())}). Fix the 'extends' line of '{path}'."
        ) from None
    return _deep_merge(_read_layered(parent_path, (*seen, path)), data)


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    path = resolve_recipe_path(name_or_path)
    data = _read_layered(path.resolve())
    data = apply_overrides(data, overrides or [])
    source = f"'{path}'" + (f" with --set {' '.join(overrides)}" if overrides else "")
    recipe = recipe_from_dict(data, source)
    recipe._stated = _own_keys(path) | {parse_override(t)[0] for o in overrides or [] for t in translate_override(o)[0]}
    return recipe, path


def _own_keys(path: Path) -> frozenset[str]:
    """Dotted keys written in the recipe file itself (its tables flattened), without `extends`."""
    out: set[str] = set()

    def walk(prefix: str, table: dict[str, Any]) -> None:
        for k, v in table.items():
            key = f"{prefix}.{k}" if prefix else k
            walk(key, v) if isinstance(v, dict) else out.add(key)

    walk("", tomllib.loads(path.read_text(encoding="utf-8")))
    return frozenset(out)


def is_stated(key: str, stated: frozenset[str] | None) -> bool:
    """Whether ``key`` (dotted) or a table above or below it is among ``stated`` keys."""
    return any(s == key or s.startswith(key + ".") or key.startswith(s + ".") for s in stated or ())


def flatten(recipe: Recipe) -> dict[str, str]:
    """Dotted key -> string value, for MLflow params and for comparing runs."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        # An empty table (prompts.names) still shows, so `recipes show` lists every key.
        if isinstance(value, dict) and value and prefix != "model.custom_config":
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = str(value)

    walk("", recipe.model_dump(mode="json"))
    return out


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of the recipe's canonical JSON: names the exact settings a model was built with."""
    import hashlib
    import json

    text = json.dumps(recipe.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def recipe_to_toml(recipe: Recipe) -> str:
    """The resolved recipe as a TOML file that `load_recipe` reads back to the same settings.

    TOML has no null: fields at null are left out, which is their default. ``extends`` becomes a
    comment, because every inherited value is already written out."""
    import tomli_w

    data = recipe.model_dump(mode="json", exclude_none=True)
    parent = data.pop("extends", None)
    head = f"# recipe '{recipe.name}'" + (f", layered on '{parent}' (resolved: every value is below)" if parent else "")
    return head + "\n" + tomli_w.dumps(data)
