"""The torch-free scorer (`aaclip_score`): its in-memory API scores encoded images as the file path
does, its pictures are matplotlib's (colormap table, font) without matplotlib, `aaclip-score` writes
what `aaclip predict --model` writes, and `aaclip predict --model FILE` loads neither torch,
open_clip nor mlflow. The detector is the tiny demo backbone with random adapters, exported to ONNX."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from aaclip_score import Detector, UnknownClass, UnreadableImage
from aaclip_score.predict import predict_with_file
from clirun import child_env, one_paragraph

from aaclip_core.deploy.export import export_onnx, write_sidecar
from aaclip_core.deploy.graph import DetectorGraph
from aaclip_core.pictures.visualize import CLIP_MEAN, CLIP_STD
from aaclip_core.prompts.anchors import AnchorBank

ROOT = Path(__file__).resolve().parents[1]
# fabric calibrated with a threshold inside the random model's scores; tile raw.
CAL = {"fabric": {"map_min": -20.0, "map_max": 40.0, "det_min": 0.45, "det_max": 0.55, "image_threshold": 0.5}}


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory, demo_overrides) -> Path:
    from aaclip_core.model import build_model
    from aaclip_core.recipe import load_recipe

    recipe = load_recipe("demo", demo_overrides)[0]
    import torch

    torch.manual_seed(3)
    model = build_model(recipe, device="cpu").eval()
    graph = DetectorGraph(model, AnchorBank(model, ["fabric", "tile"], "synthetic"), CAL, recipe.model.image_size,
                          recipe.data.domain)
    path = export_onnx(graph, tmp_path_factory.mktemp("scorer") / "detector.onnx")
    write_sidecar(path, {"format": "onnx", "classes": ["fabric", "tile"], "image_size": recipe.model.image_size,
                         "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "domain": recipe.data.domain,
                         "calibration": CAL, "calibration_source": {"dataset": "synthetic", "test_run_id": "t" * 32,
                                                                    "training_data": False}})
    return path


@pytest.fixture(scope="module")
def images(demo_root) -> list[Path]:
    return sorted((demo_root / "test" / "fabric" / "test").rglob("*.png"))[:3]


def test_score_bytes_equals_scoring_the_files(detector_file, images, tmp_path):
    det = Detector.load(detector_file)
    got = det.score_bytes([p.read_bytes() for p in images], ["fabric"] * len(images), with_maps=True)
    rows = predict_with_file(detector_file, images, tmp_path / "out", save_maps=True)["rows"]
    assert len(got) == len(rows) == 3
    for g, r in zip(got, rows):
        assert g.score == r["image_score"] and g.raw_det == r["raw_det"]
        assert g.threshold == r["threshold"] == 0.5 and g.verdict == r["verdict"] in ("normal", "anomalous")
        assert np.array_equal(g.raw_map, np.load(r["map"]))
        assert g.map.shape == g.raw_map.shape
    # A given threshold decides every verdict; an uncalibrated class has no threshold of its own.
    [hi, raw] = det.score_bytes([images[0].read_bytes()] * 2, ["fabric", "tile"], threshold=None)
    assert raw.threshold is None and raw.verdict is None and raw.map is None and hi.threshold == 0.5
    [low] = det.score_bytes([images[0].read_bytes()], ["tile"], threshold=-1e9)
    assert low.verdict == "anomalous" and low.threshold == -1e9


def test_score_bytes_names_a_broken_image_and_an_unknown_class(detector_file, images):
    det = Detector.load(detector_file)
    good = images[0].read_bytes()
    with pytest.raises(UnreadableImage, match=r"image 1 cannot be read"):
        det.score_bytes([good, good[:40]], ["fabric", "fabric"])
    with pytest.raises(UnknownClass, match=r"no class 'carpet' \(it has: fabric, tile\)") as caught:
        det.score_bytes([good], ["carpet"])
    assert caught.value.class_name == "carpet" and caught.value.known == ["fabric", "tile"]


def test_colormap_and_font_are_matplotlibs_exactly():
    """The pictures stay byte-identical to the matplotlib-drawn ones: the same jet colours for every
    value (table edges, 1.0, NaN) and the very font file."""
    import matplotlib
    from aaclip_score.overlay import FONT_FILE, heat_rgb
    from matplotlib import colormaps

    grid = np.concatenate([np.linspace(0, 1, 100_003), np.arange(257) / 256, [0.0, 1.0, np.nan, -1, 2]])
    for dtype in (np.float32, np.float64):
        x = grid.astype(dtype)
        expected = (colormaps["jet"](np.clip(x, 0.0, 1.0))[..., :3] * 255.0).round().astype(np.uint8)
        assert np.array_equal(heat_rgb(x), expected), dtype
    # The font matplotlib ships (findfont may prefer a system copy of another DejaVu release, as on a
    # machine with fonts-dejavu installed; aaclip draws with its own copy whatever the machine has).
    bundled = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    assert FONT_FILE.read_bytes() == bundled.read_bytes()


def _rows(out: Path) -> list[dict]:
    return [{k: (v.replace(str(out), "OUT") if isinstance(v, str) else v) for k, v in json.loads(line).items()}
            for line in (out / "predictions.jsonl").read_text().splitlines()]


def _score_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aaclip_score", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=child_env())


def test_aaclip_score_writes_what_predict_model_writes(detector_file, images, tmp_path):
    from typer.testing import CliRunner

    from aaclip_cli.main import app

    folder = tmp_path / "in" / "fabric"  # a folder (searched recursively) of a class the path names
    folder.mkdir(parents=True)
    for k, image in enumerate(images):
        (folder / f"{k}.png").write_bytes(image.read_bytes())
    broken = folder / "broken.png"
    broken.write_bytes(b"not a png")
    a, b = tmp_path / "predict", tmp_path / "score"
    res = CliRunner().invoke(app, ["predict", "--model", str(detector_file), str(folder), str(images[0]), "--out",
                                   str(a), "--save-maps", "-q"])
    assert res.exit_code == 1, res.output  # the broken image's error row
    done = _score_cli(detector_file, folder, images[0], "--out", b, "--save-maps", "-q")
    assert done.returncode == 1, done.stderr
    assert _rows(a) == _rows(b) and len(_rows(a)) == len(images) + 2
    assert {r["verdict"] for r in _rows(b) if not r["error"]} <= {"normal", "anomalous"}
    assert "broken.png cannot be read" in [r for r in _rows(b) if r["error"]][0]["error"]
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files if f.name != "predictions.jsonl")


def test_aaclip_score_bad_input_is_one_paragraph_exit_2(detector_file, images, tmp_path):
    copy = tmp_path / "detector.onnx"
    copy.write_bytes(detector_file.read_bytes() + b"\0")  # changed since export: sha256 differs
    side = json.loads(Path(str(detector_file) + ".json").read_text())
    Path(str(copy) + ".json").write_text(json.dumps(side))
    cases = {
        "sha256 differs": [copy, images[0]],
        "was exported for fabric, tile only": [detector_file, images[0], "--class", "carpet"],
        "--threshold must be a number": [detector_file, images[0], "--threshold", "high"],
        "detector.onnx.json is missing": [tmp_path / "nothing" / "detector.onnx", images[0]],
        "the following arguments are required": [detector_file],
    }
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "detector.onnx").write_bytes(b"x")
    for words, args in cases.items():
        done = _score_cli(*args)
        assert done.returncode == 2, (words, done.stderr)
        assert words in done.stderr and one_paragraph(done.stderr), done.stderr


RUNNER = """
import sys
from aaclip_cli.main import main
code = 0
try:
    main()  # reads sys.argv: the arguments after -c
except SystemExit as exc:
    code = exc.code or 0
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'mlflow', 'torchvision'))
print(f"exit {code}; loaded: {' '.join(heavy) or 'none of them'}", file=sys.stderr)
"""


@pytest.mark.parametrize("args, code", [
    (["--out", "{out}", "-q"], "0"), (["-h"], "0"), (["--threshold", "high"], "2"),
], ids=["scores", "help", "error"])
def test_predict_model_file_imports_no_torch_open_clip_or_mlflow(args, code, detector_file, images, tmp_path):
    """`aaclip predict --model FILE` run by aaclip's own CLI entry point in a fresh process: what it
    loaded by the end (its answer, its help, its error) holds none of the training stack."""
    argv = ["predict", "--model", str(detector_file), str(images[0])] + [a.format(out=tmp_path / "o") for a in args]
    done = subprocess.run([sys.executable, "-c", RUNNER, *argv], capture_output=True, text=True, timeout=300,
                          env=child_env(), cwd=tmp_path)
    assert done.stderr.strip().splitlines()[-1] == f"exit {code}; loaded: none of them", done.stderr[-3000:]
    if args[0] == "--out":
        assert (tmp_path / "o" / "predictions.jsonl").is_file()


def test_the_scorer_contract_fails_when_a_scorer_module_imports_torch(tmp_path):
    """import-linter's contract on aaclip_score is live: the same check on a copy where one scorer
    module imports torch fails and names the import."""
    import shutil

    for name in ("aaclip_core", "aaclip_cli", "scorer"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.ttf"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    layouts = tmp_path / "scorer" / "aaclip_score" / "layouts.py"
    layouts.write_text(layouts.read_text() + "\nimport torch  # noqa\n")
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(tmp_path / "scorer")])}
    done = subprocess.run([str(exe), "--no-cache"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "aaclip_score.layouts -> torch" in done.stdout, done.stdout[-3000:]
