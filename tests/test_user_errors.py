"""Bad input users reach outside the recipe's fields, each through the real CLI in its own process:
an --out folder that cannot be written, a recipe (or dataset list) that is not UTF-8 text, a pickled
weights file, weights of another architecture. Each is one paragraph naming the file or flag, exit 2,
no traceback, no colour codes."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest
import torch
from aaclip_score.detector import read_sidecar
from aaclip_score.outputs import check_out_dir, make_out_dir
from clirun import aaclip, one_paragraph, set_flags
from PIL import Image

from aaclip_core.data import index_dataset
from aaclip_core.errors import ConfigError, DataError
from aaclip_core.recipe import load_recipe

NOT_UTF8 = b"\xff\xfe\x00"


def _user_error(res, *named: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert one_paragraph(res.stderr), res.stderr
    for text in named:
        assert text in res.stderr, (text, res.stderr)


# ------------------------------------------------------------------------------------ predict --out


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "img.png"
    Image.new("RGB", (16, 16), (90, 30, 10)).save(path)
    return path


@pytest.mark.parametrize("how", ["parent is a file", "out is a file"])
@pytest.mark.parametrize("source", ["--run", "--model"])
def test_predict_out_that_cannot_be_a_folder(tmp_path, image, how, source):
    blocker = tmp_path / "results.txt"
    blocker.write_text("a regular file\n")
    out = blocker / "predictions" if how == "parent is a file" else blocker
    model = ["--run", "0123456789abcdef"] if source == "--run" else ["--model", str(tmp_path / "detector.onnx")]
    res = aaclip("predict", *model, str(image), "--out", str(out), "--tracking-uri",
                 f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    # Checked before the run or the model is looked up: neither exists here.
    _user_error(res, f"--out folder {out}", "Pass --out a folder you can write in")
    assert blocker.read_text() == "a regular file\n" and not (tmp_path / "mlflow.db").exists()


def test_out_folder_that_mkdir_refuses(tmp_path):
    """/proc takes no new folders, even from root (for whom permission bits do not stop a write)."""
    out = Path("/proc/aaclip-no-such-folder/out")
    check_out_dir(tmp_path / "new" / "deeper")  # creatable: no error, nothing created
    assert not (tmp_path / "new").exists()
    with pytest.raises(ConfigError, match=f"--out folder {out} cannot be written"):
        make_out_dir(out)
    make_out_dir(tmp_path / "new" / "deeper")
    assert (tmp_path / "new" / "deeper").is_dir()


# ------------------------------------------------------------------------------- text that is not UTF-8


def test_recipe_that_is_not_utf8(tmp_path, demo_overrides):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(NOT_UTF8 + b'name = "x"\n')
    res = aaclip("train", "base", "--recipe", str(bad), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                 cwd=tmp_path)
    _user_error(res, str(bad), "not UTF-8 text (byte 0xff at offset 0)", "save it as UTF-8")
    # The same through `extends`: the parent named by the child is the file named.
    child = tmp_path / "child.toml"
    child.write_text('extends = "bad.toml"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=f"Recipe file '{bad}' cannot be read: it is not UTF-8"):
        load_recipe(str(child), demo_overrides)


def test_dataset_lists_that_are_not_utf8(tmp_path):
    visa = tmp_path / "visa"
    (visa / "split_csv").mkdir(parents=True)
    csv_path = visa / "split_csv" / "1cls.csv"
    csv_path.write_bytes(b"object,split,label,image,mask\ncandle,test,normal,Images/caf\xe9.JPG,\n")  # Latin-1
    with pytest.raises(DataError, match=rf"VisA split file {csv_path} cannot be read: it is not UTF-8 text"):
        index_dataset(visa, "visa", "test")
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_bytes(b'{"image_path": "a.png", "label": 0, "class_name": "caf\xe9", "mask_path": ""}\n')
    with pytest.raises(DataError, match=rf"Metadata file {jsonl} cannot be read: it is not UTF-8 text"):
        index_dataset(jsonl, "jsonl", "test")


def test_exported_sidecar_that_is_not_utf8(tmp_path):
    model = tmp_path / "detector.onnx"
    model.write_bytes(b"onnx")
    (tmp_path / "detector.onnx.json").write_bytes(NOT_UTF8)
    with pytest.raises(ConfigError, match="detector.onnx.json is not readable JSON"):
        read_sidecar(model, verify=False)


# ------------------------------------------------------------------------------------ backbone weights


def _other_tiny_state(demo_recipe) -> dict[str, torch.Tensor]:
    """The state dict of a tiny OpenCLIP model half as wide as the demo's in its vision tower."""
    import open_clip

    from aaclip_core.model.backbone import register_custom_config

    cfg = copy.deepcopy(demo_recipe.model.custom_config)
    cfg["vision_cfg"].update(width=64, head_width=16)
    register_custom_config("aaclip-tiny-narrow", cfg)
    model = open_clip.create_model("aaclip-tiny-narrow", pretrained=None)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _train_with_weights(tmp_path, demo_overrides, weights: Path):
    return aaclip("train", "base", "--recipe", "demo", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "-q",
                  *set_flags(*demo_overrides, f'model.pretrained="{weights}"'), cwd=tmp_path)


def test_pickled_weights_file(tmp_path, demo_overrides, demo_recipe):
    weights = tmp_path / "backbone.pth"
    torch.save({"state_dict": _other_tiny_state(demo_recipe), "args": argparse.Namespace(lr=0.1)}, weights)
    res = _train_with_weights(tmp_path, demo_overrides, weights)
    _user_error(res, f"Weights file '{weights}' is a pickled PyTorch file", "argparse.Namespace",
                "does not run pickled code", "safetensors", str(weights.with_suffix(".safetensors")))
    assert "Weights only load failed" not in res.stderr and "add_safe_globals" not in res.stderr  # not torch's own explanation


def test_weights_of_another_architecture(tmp_path, demo_overrides, demo_recipe):
    from safetensors.torch import save_file

    weights = tmp_path / "narrow.safetensors"
    state = _other_tiny_state(demo_recipe)
    save_file(state, str(weights))
    res = _train_with_weights(tmp_path, demo_overrides, weights)
    wanted = {k: v.shape for k, v in _own_state(demo_recipe).items()}
    differ = sum(1 for k, v in state.items() if k in wanted and wanted[k] != v.shape)
    assert differ > 20
    _user_error(res, f"Weights file '{weights}' does not fit aaclip-tiny", f"{differ} tensor(s) have other shapes",
                "the file has 64, aaclip-tiny needs 128", "model.name")
    assert len(res.stderr.strip().splitlines()) == 1 and "size mismatch" not in res.stderr


def _own_state(demo_recipe) -> dict[str, torch.Tensor]:
    import open_clip

    from aaclip_core.model.backbone import register_custom_config

    register_custom_config("aaclip-tiny-own", demo_recipe.model.custom_config)
    return open_clip.create_model("aaclip-tiny-own", pretrained=None, force_image_size=demo_recipe.model.image_size
                                  ).state_dict()


def test_weights_file_that_is_no_weights(tmp_path, demo_overrides):
    weights = tmp_path / "notes.safetensors"
    weights.write_text(json.dumps({"not": "weights"}))
    res = _train_with_weights(tmp_path, demo_overrides, weights)
    _user_error(res, f"Weights file '{weights}' cannot be loaded into aaclip-tiny", "model.pretrained")
