"""What a derived run (`train cross --from`, `train feedback --from`) takes from the run it starts
from: the adapters were trained for that backbone on that data, so its data and model settings
come along wherever the recipe does not state its own."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from aaclip_core.checkpoints.from_run import run_recipe
from aaclip_core.recipe import Recipe, is_stated, recipe_from_dict
from aaclip_core.registry.tracking import connect

# The recipe sections a derived run takes.
INHERITED_SECTIONS = ("data", "model")


def inherit_settings(recipe: Recipe, parent: Recipe, parent_id: str) -> tuple[Recipe, dict[str, Any]]:
    """``recipe`` with the parent run's data and model settings wherever the recipe file itself or
    --set does not state them (values a shipped recipe only takes through ``extends``, e.g. the demo
    data, are replaced); returns it and the dotted keys taken, with their values."""
    ours, theirs = recipe.model_dump(mode="json"), parent.model_dump(mode="json")
    taken: dict[str, Any] = {}

    def walk(prefix: str, mine: dict, parents: dict) -> None:
        for k in sorted(set(mine) | set(parents)):
            key = f"{prefix}.{k}"
            a, b = mine.get(k), parents.get(k)
            if isinstance(a, dict) and isinstance(b, dict) and key != "model.custom_config":
                walk(key, a, b)
            elif a != b and not is_stated(key, recipe.stated_keys):
                mine[k] = b
                taken[key] = b

    for section in INHERITED_SECTIONS:
        walk(section, ours[section], theirs[section])
    merged = recipe_from_dict(ours, f"'{recipe.name}' with the data and model settings of run {parent_id}")
    merged._stated = recipe.stated_keys
    return merged, taken


def inherit_from_run(recipe: Recipe, run_id: str, tracking_uri: str | None) -> tuple[Recipe, dict[str, Any]]:
    """`inherit_settings` from the recipe a stored run was trained with."""
    mlflow = connect(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="aaclip-parent-") as tmp:
        parent = run_recipe(mlflow, run_id, Path(tmp))
    return inherit_settings(recipe, parent, run_id)


def describe_inherited(run_id: str, taken: dict[str, Any]) -> str:
    """One line for the user: what a derived run took from its parent."""
    if not taken:
        return f"run {run_id[:8]}'s data and model settings are the recipe's already; nothing inherited"
    shown = []
    for key, value in taken.items():
        text = "{...}" if isinstance(value, dict) else repr(value)
        shown.append(f"{key} = {text if len(text) <= 60 else text[:57] + '...'}")
    return (f"inherited from run {run_id[:8]} (not stated by the recipe file or --set): " + ", ".join(shown))
