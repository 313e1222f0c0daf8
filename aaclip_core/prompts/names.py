"""Which name of a class goes into its prompt sentences (SPEC §2).

The reference does not put the folder name into its prompts but a descriptive name from a table per
dataset (MVTec AD ``bottle`` -> "dark bottle"); its published numbers depend on them. That table
ships as data (``reference_prompt_names.json``, word for word) and is the default. A name is chosen,
first match wins, from:

1. ``recipe``: the recipe's ``[prompts.names]`` (the user's own classes, or an override);
2. ``checkpoint``: the name a checkpoint recorded for the class when it was trained on this dataset;
3. ``reference`` (or ``legacy``): the table, for a dataset and class it has;
4. ``folder``: the folder name with ``_`` turned into spaces.

``legacy`` is aaclip's own earlier table, used only for checkpoints that record no names (they were
trained with it). ``prompts.table = "folder"`` skips the table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from aaclip_core.prompts.legacy_names import legacy_name
from aaclip_core.recipe import DatasetRef, Recipe
from aaclip_core.record import Manifest, read_manifest

REFERENCE_TABLE_FILE = "reference_prompt_names.json"
TABLES = ("reference", "folder", "legacy")
# A run logs the names it used as a document with the sentences (record.Artifact.PROMPT_NAMES) and
# a param per class.
PROMPT_PARAM = "prompt."

# Names people give these datasets besides the table's own key (compared after `_normalise`).
_DATASET_ALIASES = {
    "MVTec": ("mvtecad", "mvtecanomalydetection"),
    "Brain": ("brainmri",),
    "Liver": ("liverct",),
    "Retina": ("retinaoct",),
    "Colon_clinicDB": ("clinicdb", "cvcclinicdb"),
    "Colon_colonDB": ("colondb", "cvccolondb"),
    "Colon_cvc300": ("cvc300",),
    "Colon_Kvasir": ("kvasir",),
}
# Layouts that belong to one dataset only (mvtec and folder layouts hold many datasets).
_LAYOUT_DATASETS = {"visa": "VisA", "btad": "BTAD", "mpdd": "MPDD"}


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@functools.cache
def reference_table() -> dict[str, dict[str, str]]:
    """The reference's table: dataset -> class folder name -> prompt name."""
    text = resources.files("aaclip_core.prompts").joinpath(REFERENCE_TABLE_FILE).read_text(encoding="utf-8")
    return json.loads(text)


@functools.cache
def _dataset_keys() -> dict[str, str]:
    keys = {_normalise(k): k for k in reference_table()}
    for key, aliases in _DATASET_ALIASES.items():
        keys.update({_normalise(a): key for a in aliases})
    return keys


def reference_dataset(name: str, layout: str | None = None) -> str | None:
    """The table's dataset for a dataset named ``name`` (case, ``-``/``_``/spaces ignored, common
    aliases such as "MVTec AD" accepted), else the one a dataset-specific ``layout`` implies."""
    return _dataset_keys().get(_normalise(name)) or _LAYOUT_DATASETS.get(layout or "")


def folder_name(class_name: str) -> str:
    return class_name.replace("_", " ")


@dataclass(frozen=True)
class PromptName:
    class_name: str
    name: str
    source: str  # recipe | checkpoint | reference | legacy | folder


@dataclass(frozen=True)
class PromptNamer:
    """Chooses the prompt name of each class of one dataset."""

    dataset: str
    table: str = "reference"  # one of TABLES
    layout: str | None = None
    overrides: Mapping[str, str] = field(default_factory=dict)
    recorded: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.table not in TABLES:
            raise ValueError(f"prompt-name table must be one of {TABLES}, not {self.table!r}")

    def resolve(self, class_name: str) -> PromptName:
        if class_name in self.overrides:
            return PromptName(class_name, self.overrides[class_name], "recipe")
        if class_name in self.recorded:
            return PromptName(class_name, self.recorded[class_name], "checkpoint")
        if self.table == "reference":
            key = reference_dataset(self.dataset, self.layout)
            name = reference_table().get(key, {}).get(class_name) if key else None
            if name:
                return PromptName(class_name, name, "reference")
        elif self.table == "legacy":
            name = legacy_name(self.dataset, class_name)
            if name:
                return PromptName(class_name, name, "legacy")
        return PromptName(class_name, folder_name(class_name), "folder")

    def record(self, class_names: Iterable[str]) -> dict[str, Any]:
        """What a checkpoint stores: the table in force and the name of every trained class."""
        return {
            "table": self.table,
            "dataset": self.dataset,
            "names": {c: self.resolve(c).name for c in sorted(set(class_names))},
        }


def training_namer(recipe: Recipe, ref: DatasetRef) -> PromptNamer:
    """Names for training on (or describing) ``ref`` with ``recipe``."""
    return PromptNamer(ref.name, recipe.prompts.table, ref.layout, dict(recipe.prompts.names))


def checkpoint_namer(recipe: Recipe, ref: DatasetRef, manifest: Mapping[str, Any] | Manifest) -> PromptNamer:
    """Names for evaluating a checkpoint on ``ref``: as it was trained. A checkpoint that records no
    names predates them and was trained with aaclip's old table, which it keeps."""
    overrides = dict(recipe.prompts.names)
    record = read_manifest(manifest).prompt_names
    if not isinstance(record, Mapping):
        table = "legacy" if recipe.prompts.table == "reference" else recipe.prompts.table
        return PromptNamer(ref.name, table, ref.layout, overrides)
    same_data = _normalise(str(record.get("dataset", ""))) == _normalise(ref.name)
    recorded = dict(record.get("names") or {}) if same_data and record.get("table") == recipe.prompts.table else {}
    return PromptNamer(ref.name, recipe.prompts.table, ref.layout, overrides, recorded)


def scoring_namer(recipe: Recipe, dataset: str, manifest: Mapping[str, Any] | Manifest,
                  test_names: Mapping[str, str] | None = None) -> PromptNamer:
    """Names for scoring images with a checkpoint (`predict`, exported detectors) as its test run on
    ``dataset`` did: that run's logged names where there are any, else what `test` would choose."""
    test = recipe.data.test
    ref = test if test.name == dataset else DatasetRef(name=dataset, layout="auto")
    namer = checkpoint_namer(recipe, ref, manifest)
    if test_names:
        namer = dataclasses.replace(namer, recorded={**namer.recorded, **test_names})
    return namer


def differences_from_reference(dataset: str, names: Mapping[str, str], layout: str | None = None) -> dict[str, tuple[str, str]]:
    """class -> (name used, the reference's name) for the classes of a known dataset whose name is
    not the reference's; empty when the dataset is not in the table."""
    key = reference_dataset(dataset, layout)
    table = reference_table().get(key, {}) if key else {}
    return {c: (n, table[c]) for c, n in sorted(names.items()) if c in table and table[c] != n}
