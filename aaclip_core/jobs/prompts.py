"""`aaclip prompts`: the prompt name and the 16 sentences a class gets, for a recipe or as a run used them."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

from aaclip_core.checkpoints.from_run import run_recipe
from aaclip_core.errors import ConfigError, TrackingError
from aaclip_core.prompts.names import PromptName, PromptNamer, training_namer
from aaclip_core.prompts.templates import split_prompts
from aaclip_core.recipe import DatasetRef, Recipe
from aaclip_core.record import Artifact
from aaclip_core.registry.tracking import connect, download, get_run


def prompt_card(dataset: str, p: PromptName) -> dict:
    """One class's prompts as `aaclip prompts --json` prints them."""
    normal, abnormal = split_prompts(p.name)
    return {"dataset": dataset, "class": p.class_name, "name": p.name, "source": p.source,
            "normal": normal, "abnormal": abnormal}


def describe(recipe: Recipe, dataset: str, class_name: str) -> dict:
    """What training on, or testing on, ``dataset`` with ``recipe`` puts into the class's prompts."""
    known = [r for r in (recipe.data.train, recipe.data.test) if r.name.lower() == dataset.lower()]
    ref = known[0] if known else DatasetRef(name=dataset, layout="auto")
    return prompt_card(dataset, training_namer(recipe, ref).resolve(class_name))


def run_prompts(run_id: str, class_name: str | None = None, tracking_uri: str | None = None) -> dict:
    """The names a training or test run used, from its logged record; for runs that predate it,
    the names of aaclip's old table (what they used) for the classes they list."""
    mlflow = connect(tracking_uri)
    run = get_run(mlflow, run_id)
    with tempfile.TemporaryDirectory(prefix="aaclip-prompts-") as tmp:
        workdir = Path(tmp)
        try:
            doc = json.loads(download(mlflow, run_id, Artifact.PROMPT_NAMES, workdir).read_text(encoding="utf-8"))
            dataset, logged = doc["dataset"], True
            cards = {c: {"dataset": dataset, "class": c, **v} for c, v in doc["classes"].items()}
        except TrackingError:
            dataset, classes = _unlogged_classes(mlflow, run, workdir)
            namer, logged = PromptNamer(dataset, "legacy"), False
            cards = {c: prompt_card(dataset, namer.resolve(c)) for c in classes}
    if class_name is not None:
        if class_name not in cards:
            raise ConfigError(
                f"Run {run_id} has no class '{class_name}' (--class); its classes: {', '.join(sorted(cards))}."
            )
        cards = {class_name: cards[class_name]}
    return {"run_id": run_id, "dataset": dataset, "logged": logged, "classes": [cards[c] for c in sorted(cards)]}


def _unlogged_classes(mlflow, run, workdir: Path) -> tuple[str, list[str]]:
    """Dataset and classes of a run from before prompt names were logged: a test run's per-class
    results, or a training run's recorded training data."""
    run_id = run.info.run_id
    params = run.data.params
    try:
        if "test.dataset" in params:
            path = download(mlflow, run_id, Artifact.result(Artifact.PER_CLASS), workdir)
            with open(path, newline="", encoding="utf-8") as f:
                return params["test.dataset"], sorted({row["class_name"] for row in csv.DictReader(f)})
        recipe = run_recipe(mlflow, run_id, workdir)
        path = download(mlflow, run_id, Artifact.data(Artifact.TRAIN_SAMPLES), workdir)
        lines = path.read_text(encoding="utf-8").splitlines()
        return recipe.data.train.name, sorted({json.loads(line)["class_name"] for line in lines if line.strip()})
    except TrackingError:
        raise ConfigError(
            f"Run {run_id} logged no prompt names and no class list to rebuild them from (only training "
            "and test runs have them; a feedback loop's names are on its parent run)."
        ) from None
