"""The run record (aaclip_core.record): the names existing runs already carry, and checkpoint
manifests of every shape aaclip has written read back the same."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from aaclip_core.checkpoints.checkpoint import ADAPTERS, MANIFEST, load_checkpoint, save_checkpoint
from aaclip_core.model.aaclip import ModelModes
from aaclip_core.record import (
    MANIFEST_VERSION,
    TRAINING_STAGES,
    Artifact,
    CheckpointStage,
    Manifest,
    Stage,
    Tag,
    read_manifest,
)

# A manifest as aaclip wrote them before the version field and the ``modes`` entry existed.
OLD_MANIFEST = {
    "stage": "stage2",
    "epoch": 6,
    "loop": None,
    "fidelity": "official",
    "backbone": "aaclip-tiny:none@112",
    "cross_attention": True,
    "cross_attention_on": {"text": True, "image": False},
    "context_source": "image_path",
    "recipe": {"stage2": {"lr": 0.001}},
    "val": {"pixel_auroc": 0.9, "aupro": None},
}


def test_stage_values_are_the_strings_existing_runs_carry():
    assert [s.value for s in Stage] == ["base", "cross", "feedback", "feedback-loop", "test", "imported", "sweep"]
    assert [s.value for s in CheckpointStage] == ["stage1", "stage2", "imported"]
    assert TRAINING_STAGES == ("base", "cross", "feedback", "imported")
    assert CheckpointStage.after(2) is CheckpointStage.STAGE2


def test_a_stage_prints_formats_and_serialises_as_its_bare_value():
    # Tags, MLflow filter strings and JSON results must stay byte-identical to the plain strings.
    assert str(Stage.FEEDBACK_LOOP) == f"{Stage.FEEDBACK_LOOP}" == "feedback-loop"
    assert f"tags.`{Tag.STAGE}` = '{Stage.TEST}'" == "tags.`aaclip.stage` = 'test'"
    assert json.dumps({"stage": Stage.IMPORTED}) == '{"stage": "imported"}'
    assert {"base": 1}[Stage.BASE] == 1  # a tag value read back finds the enum's entry, and back
    assert ", ".join(TRAINING_STAGES) == "base, cross, feedback, imported"


def test_tag_names_are_the_ones_existing_runs_carry():
    assert (Tag.STAGE, Tag.SELECTED_CHECKPOINT, Tag.SOURCE_RUN, Tag.HEARTBEAT) == (
        "aaclip.stage", "aaclip.selected_checkpoint", "aaclip.source_run", "aaclip.heartbeat")
    assert Tag.adapter("text_adapter") == "aaclip.text_adapter"
    assert Tag.adapter_sha256("image_adapter") == "aaclip.image_adapter.sha256"
    assert Tag.adapter_epoch("text_adapter") == "aaclip.text_adapter.epoch"
    assert Tag.base_adapter_sha256("text") == "aaclip.base_text_adapter_sha256"
    assert Tag.base_adapter_epoch("image") == "aaclip.base_image_adapter_epoch"


def test_artifact_paths_are_the_ones_existing_runs_hold():
    assert Artifact.result(Artifact.REPORT) == "results/report.json"
    assert Artifact.result(Artifact.PIXEL_PAIRS) == "results/pixel_pairs.npz"
    assert Artifact.data(Artifact.TRAIN_SAMPLES) == "data/train.jsonl"
    assert Artifact.checkpoint("final") == "checkpoints/final"
    assert Artifact.checkpoint("loop_2_stage_2", MANIFEST) == "checkpoints/loop_2_stage_2/manifest.json"
    assert (Artifact.RECIPE, Artifact.PROMPT_NAMES) == ("recipe.json", "prompts/names.json")


def test_an_old_manifest_reads_with_its_modes_and_round_trips_unchanged():
    m = read_manifest(OLD_MANIFEST)
    assert (m.stage, m.epoch, m.loop, m.format_version) == ("stage2", 6, None, None)
    assert m.val == {"pixel_auroc": 0.9, "aupro": None} and m.prompt_names is None
    assert m.model_modes() == {"text_cross": True, "image_cross": False, "context_source": "image_path"}
    assert ModelModes.from_manifest(OLD_MANIFEST) == ModelModes(True, False, "image_path")
    assert m.as_dict() == OLD_MANIFEST  # nothing lost or added by reading it


def test_an_old_manifest_without_switches_follows_cross_attention():
    m = read_manifest({"stage": "stage1", "epoch": 2, "loop": None, "cross_attention": False})
    assert m.model_modes() == {"text_cross": False, "image_cross": False, "context_source": "dpam"}


def test_a_written_manifest_round_trips_and_keeps_its_json_form():
    m = Manifest(stage=CheckpointStage.IMPORTED, epoch=None, fidelity="official", backbone="b", cross_attention=False,
                 modes={"text_cross": False, "image_cross": False, "context_source": "dpam"}, recipe={},
                 prompt_names={"table": "reference", "dataset": "MVTec", "names": {}}, text_epoch=5, image_epoch=0)
    d = m.as_dict()
    # Unset optional fields are left out; stage, epoch and loop are always written (null when empty).
    assert d["stage"] == "imported" and type(d["stage"]) is str
    assert d["epoch"] is None and d["loop"] is None and "val" not in d and "format_version" not in d
    assert read_manifest(json.loads(json.dumps(d))) == m


def test_a_checkpoint_with_an_old_manifest_on_disk_still_loads(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    save_file({"text_adapter.w": torch.zeros(2)}, str(folder / ADAPTERS))
    (folder / MANIFEST).write_text(json.dumps(OLD_MANIFEST), encoding="utf-8")
    ckpt = load_checkpoint(folder)
    assert ckpt.manifest == OLD_MANIFEST and ckpt.info.epoch == 6
    # Saving it again adds the version, and changes nothing else.
    again = load_checkpoint(save_checkpoint(tmp_path / "new", ckpt.adapters, ckpt.manifest))
    assert again.manifest == {**OLD_MANIFEST, "format_version": MANIFEST_VERSION}
