"""Prompt names (issue 11): the reference's table by default, recipe overrides, the folder-name
switch, names recorded on runs and checkpoints, and old checkpoints keeping their names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from typer.testing import CliRunner

from aaclip_cli.main import app
from aaclip_core.compare.rows import TestResult
from aaclip_core.prompts.anchors import AnchorBank
from aaclip_core.prompts.names import (
    PromptNamer,
    checkpoint_namer,
    reference_dataset,
    reference_table,
    training_namer,
)
from aaclip_core.prompts.templates import class_prompts
from aaclip_core.recipe import DatasetRef, load_recipe

# The reference's templates, typed from its prompt code (not imported from aaclip): each state in
# each template, normal states first.
REF_NORMAL = ["{}", "a {}", "the {}"]
REF_ABNORMAL = ["a damaged {}", "a broken {}", "a {} with flaw", "a {} with defect", "a {} with damage"]
REF_TEMPLATES = ["{}.", "a photo of {}."]


def reference_expansion(name: str) -> tuple[list[str], list[str]]:
    normal = [t.replace("{}", s.replace("{}", name)) for s in REF_NORMAL for t in REF_TEMPLATES]
    abnormal = [t.replace("{}", s.replace("{}", name)) for s in REF_ABNORMAL for t in REF_TEMPLATES]
    return normal, abnormal


TABLE_CLASSES = [(d, c, n) for d, classes in reference_table().items() for c, n in classes.items()]


def test_shipped_table_covers_the_reference_datasets():
    table = reference_table()
    sizes = {d: len(table[d]) for d in ("MVTec", "VisA", "MPDD", "BTAD")}
    assert sizes == {"MVTec": 15, "VisA": 12, "MPDD": 6, "BTAD": 3}
    for medical in ("Brain", "Liver", "Retina", "Colon_clinicDB", "Colon_colonDB", "Colon_cvc300", "Colon_Kvasir"):
        assert medical in table
    # Spot checks against the reference's table, word for word.
    assert table["MVTec"]["bottle"] == "dark bottle"
    assert table["MVTec"]["pill"] == "oval white pill with small red speckles and the letters 'FF' engraved"
    assert table["VisA"]["pcb3"] == "infrared sensor pcb module"
    assert table["Colon_cvc300"]["CVC-300"] == "colon endoscopy image"
    assert table["Liver"]["Liver"] == "scan"


@pytest.mark.parametrize(("dataset", "class_name", "name"), TABLE_CLASSES)
def test_every_table_class_gets_the_reference_sentences(dataset, class_name, name):
    namer = PromptNamer(dataset)
    chosen = namer.resolve(class_name)
    assert (chosen.name, chosen.source) == (name, "reference")
    normal, abnormal = reference_expansion(name)
    assert len(normal) == 6 and len(abnormal) == 10
    assert class_prompts(chosen.name) == normal + abnormal


def test_both_fidelities_use_the_table(demo_overrides):
    for fidelity in ("official", "corrected"):
        recipe, _ = load_recipe("base", [f'fidelity="{fidelity}"'])
        assert training_namer(recipe, recipe.data.test).resolve("cable").name == "top view of three cables"
        assert training_namer(recipe, recipe.data.train).resolve("pcb1").name == "dual ultrasonic distance sensor pcb module"


@pytest.mark.parametrize(
    ("name", "layout", "key"),
    [
        ("MVTec", None, "MVTec"),
        ("MVTec AD", None, "MVTec"),
        ("mvtec_anomaly_detection", "auto", "MVTec"),
        ("visa", None, "VisA"),
        ("my visa copy", "visa", "VisA"),
        ("btad", None, "BTAD"),
        ("parts", "mpdd", "MPDD"),
        ("kvasir", None, "Colon_Kvasir"),
        ("CVC-300", None, "Colon_cvc300"),
        ("brain MRI", None, "Brain"),
        ("synthetic", "synthetic", None),
        ("my-own", "mvtec", None),
    ],
)
def test_dataset_matching(name, layout, key):
    assert reference_dataset(name, layout) == key


def test_unknown_classes_and_folder_switch():
    assert PromptNamer("MVTec").resolve("brand_new_part").name == "brand new part"
    assert PromptNamer("my-own").resolve("pcb3").source == "folder"
    folder = PromptNamer("MVTec", table="folder").resolve("metal_nut")
    assert (folder.name, folder.source) == ("metal nut", "folder")


def test_recipe_section_overrides_and_switch(demo_overrides):
    recipe, _ = load_recipe("base", ['prompts.names.bottle="green glass bottle"', 'prompts.table="folder"'])
    namer = training_namer(recipe, DatasetRef(name="MVTec"))
    assert namer.resolve("bottle").name == "green glass bottle" and namer.resolve("bottle").source == "recipe"
    assert namer.resolve("cable").name == "cable"


def test_recipe_rejects_an_unknown_table_and_blank_names():
    from aaclip_core.errors import ConfigError

    with pytest.raises(ConfigError, match="prompts.table"):
        load_recipe("base", ['prompts.table="mine"'])
    with pytest.raises(ConfigError, match="prompt name of class 'bottle' is empty"):
        load_recipe("base", ['prompts.names.bottle=" "'])


def _manual_anchors(model, name: str) -> torch.Tensor:
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model.encode_text(model.tokenize(class_prompts(name))), dim=-1)
    normal = torch.nn.functional.normalize(emb[:6].mean(0), dim=-1)
    abnormal = torch.nn.functional.normalize(emb[6:].mean(0), dim=-1)
    return torch.stack([normal, abnormal], dim=-1)


def test_recipe_override_changes_the_anchors(make_model, demo_recipe):
    model = make_model()
    default = AnchorBank(model, ["bottle"], PromptNamer("MVTec"))
    data = demo_recipe.model_dump(mode="json")
    data["prompts"]["names"]["bottle"] = "green glass bottle"
    recipe = type(demo_recipe).model_validate(data)
    overridden = AnchorBank(model, ["bottle"], training_namer(recipe, DatasetRef(name="MVTec")))
    with torch.no_grad():
        a, b = default.anchors(["bottle"])[0], overridden.anchors(["bottle"])[0]
    assert torch.allclose(a, _manual_anchors(model, "dark bottle"), atol=1e-5)
    assert torch.allclose(b, _manual_anchors(model, "green glass bottle"), atol=1e-5)
    assert (a - b).abs().max() > 1e-3


def test_checkpoint_namer_keeps_recorded_and_legacy_names(demo_recipe):
    ref = DatasetRef(name="MVTec")
    # A checkpoint that records no names was trained with aaclip's old table.
    old = checkpoint_namer(demo_recipe, ref, {"stage": "stage2"})
    assert old.table == "legacy" and old.resolve("bottle").name == "bottle"
    assert old.resolve("metal_nut").source == "legacy"
    assert PromptNamer("VisA", table="legacy").resolve("pcb1").name == "printed circuit board"
    # Recorded names win over today's table for the dataset they were recorded on.
    record = {"table": "reference", "dataset": "MVTec", "names": {"bottle": "an older bottle name"}}
    new = checkpoint_namer(demo_recipe, ref, {"prompt_names": record})
    assert new.resolve("bottle").name == "an older bottle name" and new.resolve("bottle").source == "checkpoint"
    assert new.resolve("cable").name == "top view of three cables"
    # ... and do not leak onto another dataset's classes of the same folder name.
    other = checkpoint_namer(demo_recipe, DatasetRef(name="mine"), {"prompt_names": record})
    assert other.resolve("bottle").name == "bottle"


# ------------------------------------------------------------------------------------------ CLI, runs


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def test_prompts_command_json_of_mvtec_bottle():
    result = _invoke(["prompts", "--dataset", "MVTec", "--class", "bottle", "--json"])
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)
    normal, abnormal = reference_expansion("dark bottle")
    assert card == {"dataset": "MVTec", "class": "bottle", "name": "dark bottle", "source": "reference",
                    "normal": normal, "abnormal": abnormal}


def test_prompts_command_with_recipe_set_and_bad_usage():
    result = _invoke(["prompts", "--dataset", "MVTec", "--class", "bottle", "--set",
                      'prompts.names.bottle="amber bottle"', "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["name"] == "amber bottle"
    result = _invoke(["prompts", "--dataset", "MVTec"])
    assert result.exit_code == 2 and "--class" in result.output and "Traceback" not in result.output


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, demo_overrides):
    """A one-epoch demo base run and a test of it, plus an old-style copy of it: recipe and
    checkpoint without prompt names, as runs trained before names were recorded are."""
    workdir = tmp_path_factory.mktemp("prompt-names")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    sets = []
    for o in [*demo_overrides, "stage1.epochs=1", "stage2.epochs=1"]:
        sets += ["--set", o]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        train = _invoke(["train", "base", "--recipe", "demo", "--json", "--tracking-uri", uri, *sets])
        assert train.exit_code == 0, train.output
        run_id = json.loads(train.stdout)["run_id"]
        client = mlflow.MlflowClient(uri)
        src = Path(client.download_artifacts(run_id, "", str(workdir / "src")))
        recipe = json.loads((src / "recipe.json").read_text())
        del recipe["prompts"]  # recipes had no [prompts] section
        manifest_path = src / "checkpoints" / "final" / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        del manifest["prompt_names"]
        manifest_path.write_text(json.dumps(manifest))
        (src / "recipe.json").write_text(json.dumps(recipe))
        shutil.rmtree(src / "prompts")
        run = client.get_run(run_id)
        old = client.create_run(run.info.experiment_id, tags={k: v for k, v in run.data.tags.items()
                                                              if k.startswith("aaclip.")})
        client.log_artifact(old.info.run_id, str(src / "recipe.json"))
        client.log_artifact(old.info.run_id, str(src / "data" / "train.jsonl"), "data")
        client.log_artifacts(old.info.run_id, str(src / "checkpoints" / "final"), "checkpoints/final")
        client.set_terminated(old.info.run_id)
        tests = {}
        for rid in (run_id, old.info.run_id):
            test = _invoke(["test", "--run", rid, "--json", "--tracking-uri", uri])
            assert test.exit_code == 0, test.output
            tests[rid] = json.loads(test.stdout)["run_id"]
    return {"uri": uri, "run": run_id, "old": old.info.run_id, "tests": tests, "workdir": workdir}


DEMO_NAMES = {"plank": "wooden plank", "fabric": "woven fabric", "disc": "metal disc"}


def test_runs_and_checkpoints_record_the_names(short_run):
    from aaclip_core.checkpoints.checkpoint import load_checkpoint

    client = mlflow.MlflowClient(short_run["uri"])
    for rid in (short_run["run"], short_run["tests"][short_run["run"]]):
        params = client.get_run(rid).data.params
        assert {c: params[f"prompt.{c}"] for c in DEMO_NAMES} == DEMO_NAMES
        doc = json.loads(Path(client.download_artifacts(rid, "prompts/names.json", str(short_run["workdir"] / rid)))
                         .read_text())
        assert {c: v["name"] for c, v in doc["classes"].items()} == DEMO_NAMES
        assert doc["classes"]["disc"]["normal"][0] == "metal disc."
    ckpt = load_checkpoint(Path(client.download_artifacts(short_run["run"], "checkpoints/final",
                                                          str(short_run["workdir"] / "ck"))))
    assert ckpt.manifest["prompt_names"] == {"table": "reference", "dataset": "synthetic", "names": DEMO_NAMES}


def test_old_checkpoint_evaluates_with_the_names_it_was_trained_with(short_run):
    """An old run's recipe has no [prompts] section, so today's default would be the folder names
    ("plank"); it was trained with aaclip's old table ("wooden plank") and is tested with it."""
    client = mlflow.MlflowClient(short_run["uri"])
    test_id = short_run["tests"][short_run["old"]]
    params = client.get_run(test_id).data.params
    assert {c: params[f"prompt.{c}"] for c in DEMO_NAMES} == DEMO_NAMES
    doc = json.loads(Path(client.download_artifacts(test_id, "prompts/names.json", str(short_run["workdir"] / "o")))
                     .read_text())
    assert {v["source"] for v in doc["classes"].values()} == {"legacy"}


def test_prompts_command_shows_a_runs_names(short_run):
    result = _invoke(["prompts", "--run", short_run["run"], "--class", "disc", "--json",
                      "--tracking-uri", short_run["uri"]])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["logged"] is True and [c["name"] for c in out["classes"]] == ["metal disc"]
    assert out["classes"][0]["abnormal"] == reference_expansion("metal disc")[1]
    result = _invoke(["prompts", "--run", short_run["run"], "--class", "wombat", "--tracking-uri", short_run["uri"]])
    assert result.exit_code == 2 and "wombat" in result.output
    # A run from before logged names: the old table's names for the classes it trained on.
    result = _invoke(["prompts", "--run", short_run["old"], "--json", "--tracking-uri", short_run["uri"]])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["logged"] is False
    assert {c["class"]: (c["name"], c["source"]) for c in out["classes"]} == {
        c: (n, "legacy") for c, n in DEMO_NAMES.items()}


def test_compare_marks_a_prompt_name_difference_unfair():
    from aaclip_core.compare.fairness import _prompt_names_diff

    a = TestResult("t", "MVTec", "final", {}, None, {}, True, prompt_names={"bottle": "dark bottle"})
    b = TestResult("u", "MVTec", "final", {}, None, {}, True, prompt_names={"bottle": "bottle"})
    assert _prompt_names_diff("MVTec", a, b) == [
        "prompt names differ on MVTec for 1 class(es) (bottle: 'dark bottle' vs 'bottle')"]
    assert _prompt_names_diff("MVTec", a, a) == []


def test_compare_takes_unlogged_test_names_as_the_old_table():
    from aaclip_core.compare.fairness import used_prompt_names

    old = TestResult("t", "MVTec", "final", {}, None, {}, True, prompt_names=None)
    assert used_prompt_names(old, ["bottle", "metal_nut"]) == {"bottle": "bottle", "metal_nut": "metal nut"}
    new = TestResult("u", "MVTec", "final", {}, None, {}, True, prompt_names={"bottle": "dark bottle"})
    assert used_prompt_names(new, ["bottle"]) == {"bottle": "dark bottle"}


def _doctor_checks(*args) -> dict:
    result = _invoke(["doctor", "--json", *args])
    assert result.exit_code in (0, 1), result.output  # 1: another check (data, weights) fails here
    return {c["name"]: c for c in json.loads(result.stdout)["checks"]}


def test_doctor_warns_on_non_reference_names_in_official_fidelity(tmp_path):
    uri = ["--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    checks = _doctor_checks("--recipe", "base", *uri)
    assert checks["prompt names (test: MVTec)"]["status"] == "pass"
    assert checks["prompt names (train: VisA)"]["status"] == "pass"
    checks = _doctor_checks("--recipe", "base", "--set", 'prompts.names.bottle="bottle"', *uri)
    warn = checks["prompt names (test: MVTec)"]
    assert warn["status"] == "warn" and warn["value"] == 1 and "bottle: 'bottle' (reference: 'dark bottle')" in warn["detail"]
    checks = _doctor_checks("--recipe", "base", "--set", 'prompts.table="folder"', "--set", 'fidelity="corrected"', *uri)
    assert checks["prompt names (test: MVTec)"]["status"] == "pass"  # allowed outside official fidelity
    assert checks["prompt names (test: MVTec)"]["value"] == 14  # every MVTec class but screw


def test_doctor_names_a_run_that_used_the_old_table():
    from aaclip_core.doctor.static import check_prompt_names

    old = PromptNamer("VisA", table="legacy")
    names = {c: old.resolve(c).name for c in reference_table()["VisA"]}
    check = check_prompt_names("official", "VisA", names, "run prompt names", legacy=True)
    assert check.status == "warn" and check.value == 8 and "aaclip's old name table" in check.detail
