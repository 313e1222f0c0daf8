"""Images and masks as industrial data brings them: 16-bit greyscale, palette, RGBA, CMYK JPEG,
EXIF-rotated JPEG, upper-case extensions, masks in those modes too. Each loads, and exactly as the
reference reads it (``Image.open(p).convert("RGB")`` for images, ``convert("L")`` then ``!= 0`` for
masks). An image whose header declares more pixels than PIL decodes (a decompression bomb) is one
paragraph naming the file in `train` and `test`, and an error row in `predict` while the other
images are scored."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from aaclip_score.detector import preprocess
from aaclip_score.images import UnreadableImage, read_grey, read_rgb, read_size
from aaclip_score.inputs import collect_images
from clirun import aaclip, one_paragraph, set_flags
from PIL import Image

from aaclip_core.data import AnomalyDataset, Sample, index_dataset, load_image_tensor, validate_samples
from aaclip_core.errors import DataError

SIZE = 24
ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def _pattern(w: int = 40, h: int = 30) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 6 % 256, y * 8 % 256, (x + y) * 3 % 256], axis=-1).astype(np.uint8)


def _write_modes(folder: Path) -> dict[str, Path]:
    """One file per mode; all 40x30 and not square, so a rotation would show."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(_pattern())
    grey16 = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 53) % 65535
    files = {
        "I;16 png": (Image.fromarray(grey16.astype(np.uint16)), "grey16.png"),
        "P png": (rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "palette.png"),
        "RGBA png": (Image.fromarray(np.dstack([_pattern(), _pattern()[..., 0]])), "alpha.png"),
        "LA png": (rgb.convert("LA"), "grey_alpha.png"),
        "1 png": (rgb.convert("1"), "bilevel.png"),
        "CMYK jpeg": (rgb.convert("CMYK"), "cmyk.jpg"),
        "upper-case PNG": (rgb, "UPPER.PNG"),
        "upper-case JPG": (rgb, "UPPER.JPG"),
    }
    paths = {}
    for mode, (image, name) in files.items():
        image.save(folder / name)
        paths[mode] = folder / name
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rgb.save(folder / "rotated.jpg", exif=exif)
    paths["EXIF-rotated jpeg"] = folder / "rotated.jpg"
    # Palette with a transparent index: PIL's conversion warns but still converts.
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.save(folder / "palette_transparent.png", transparency=0)
    paths["P png with transparency"] = folder / "palette_transparent.png"
    return paths


def _reference(path: Path) -> np.ndarray:
    """The reference AA-CLIP reading, resized the way aaclip resizes (bicubic to S x S)."""
    rgb = Image.open(path).convert("RGB")
    return np.asarray(rgb.resize((SIZE, SIZE), Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def modes(tmp_path_factory) -> dict[str, Path]:
    return _write_modes(tmp_path_factory.mktemp("modes"))


def test_every_mode_loads_as_the_reference_reads_it(modes):
    assert Image.open(modes["I;16 png"]).mode == "I;16" and Image.open(modes["CMYK jpeg"]).mode == "CMYK"
    assert Image.open(modes["P png"]).mode == "P" and Image.open(modes["RGBA png"]).mode == "RGBA"
    for mode, path in modes.items():
        want = _reference(path)
        tensor = load_image_tensor(path, SIZE, ZERO, ONE)  # mean 0, std 1: the uint8 picture / 255
        got = np.rint(tensor.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        np.testing.assert_array_equal(got, want, err_msg=mode)
        item = AnomalyDataset([Sample(path, 0, "c", None)], SIZE, ZERO, ONE)[0]
        torch.testing.assert_close(item["image"], tensor, msg=mode)
        _, picture = preprocess(path, SIZE, ZERO, ONE)  # the exported-file scorer reads the same
        np.testing.assert_array_equal(picture, want, err_msg=mode)
        assert read_size(path) == (40, 30), mode


def test_what_each_mode_becomes(modes):
    """What PIL's conversion makes of the modes that lose information, stated once."""
    grey16 = np.asarray(Image.open(modes["I;16 png"]))
    rgb = np.asarray(read_rgb(modes["I;16 png"]))
    # 16-bit greyscale is clipped to 0..255, not scaled: every value above 255 becomes white.
    np.testing.assert_array_equal(rgb[..., 0], np.minimum(grey16, 255).astype(np.uint8))
    assert (rgb[..., 0] == rgb[..., 2]).all() and (grey16 > 255).mean() > 0.5
    # The alpha of an RGBA image is dropped, not composited on a background.
    np.testing.assert_array_equal(np.asarray(read_rgb(modes["RGBA png"])), _pattern())
    # EXIF orientation is ignored: the pixels come as stored (40 wide, 30 high), like the reference.
    assert Image.open(modes["EXIF-rotated jpeg"]).getexif()[0x0112] == 6
    assert read_rgb(modes["EXIF-rotated jpeg"]).size == (40, 30)


def _mask_files(folder: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """Masks in several modes, each with the anomalous pixels it marks."""
    folder.mkdir(parents=True, exist_ok=True)
    marked = np.zeros((30, 40), bool)
    marked[5:12, 8:20] = True
    marked[20, 30] = True  # one isolated pixel
    out = {}
    grey16 = np.where(marked, 1, 0).astype(np.uint16)  # value 1 in 16 bits: still anomalous
    grey16[marked & (np.arange(40)[None] % 2 == 0)] = 40000
    pal = Image.fromarray(marked.astype(np.uint8), mode="L").convert("P")
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[marked] = (255, 255, 255, 255)
    masks = {
        "I;16": (Image.fromarray(grey16), "m16.png"),
        "P": (pal, "mp.png"),
        "RGBA": (Image.fromarray(rgba), "mrgba.png"),
        "1": (Image.fromarray(marked), "m1.png"),
        "L upper-case": (Image.fromarray(marked.astype(np.uint8) * 255), "mL.PNG"),
    }
    for mode, (image, name) in masks.items():
        image.save(folder / name)
        out[mode] = (folder / name, marked)
    return out


def test_masks_in_every_mode_mark_the_same_pixels(tmp_path):
    image = tmp_path / "image.png"
    Image.fromarray(_pattern()).save(image)
    for mode, (path, marked) in _mask_files(tmp_path / "masks").items():
        assert Image.open(path).mode == mode.split()[0], mode
        np.testing.assert_array_equal(np.asarray(read_grey(path)) != 0, marked, err_msg=mode)
        reference = np.asarray(Image.open(path).convert("L").resize((SIZE, SIZE), Image.Resampling.NEAREST)) != 0
        sample = Sample(image, 1, "c", path, "defect")
        validate_samples([sample])
        item = AnomalyDataset([sample], SIZE, ZERO, ONE)[0]
        np.testing.assert_array_equal(item["mask"][0].numpy().astype(bool), reference, err_msg=mode)


def test_upper_case_extensions_are_indexed_and_collected(tmp_path):
    img = Image.fromarray(_pattern())
    mask = Image.fromarray(np.pad(np.ones((4, 4), np.uint8) * 255, ((3, 23), (3, 33))))
    mvtec = tmp_path / "mvtec" / "widget"
    for sub in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (mvtec / sub).mkdir(parents=True)
    img.save(mvtec / "train/good/000.PNG")
    img.save(mvtec / "test/good/001.JPG")
    img.save(mvtec / "test/crack/002.PNG")
    mask.save(mvtec / "ground_truth/crack/002_mask.PNG")
    img.save(mvtec / "test/crack/003.jpeg")
    mask.save(mvtec / "ground_truth/crack/003_mask.png")
    samples = index_dataset(tmp_path / "mvtec", "mvtec", "test")
    assert sorted((s.image_path.name, s.mask_path and s.mask_path.name) for s in samples) == [
        ("001.JPG", None), ("002.PNG", "002_mask.PNG"), ("003.jpeg", "003_mask.png")]
    assert [s.image_path.name for s in index_dataset(tmp_path / "mvtec", "mvtec", "train")] == ["000.PNG"]
    validate_samples(samples)

    btad = tmp_path / "btad" / "01"
    for sub in ("train/ok", "test/ok", "test/ko", "ground_truth/ko"):
        (btad / sub).mkdir(parents=True)
    img.save(btad / "train/ok/0.BMP")
    img.save(btad / "test/ok/1.PNG")
    img.save(btad / "test/ko/2.PNG")
    mask.save(btad / "ground_truth/ko/2.BMP")
    by_name = {s.image_path.name: s for s in index_dataset(tmp_path / "btad", "btad", "test")}
    assert set(by_name) == {"1.PNG", "2.PNG"} and by_name["2.PNG"].mask_path.name == "2.BMP"

    folder = tmp_path / "folder" / "part"
    for sub in ("normal", "anomaly", "masks"):
        (folder / sub).mkdir(parents=True)
    img.save(folder / "normal/a.TIF")
    img.save(folder / "anomaly/b.JPG")
    mask.save(folder / "masks/b.PNG")
    by_name = {s.image_path.name: s for s in index_dataset(tmp_path / "folder", "folder", "test")}
    assert set(by_name) == {"a.TIF", "b.JPG"} and by_name["b.JPG"].mask_path.name == "b.PNG"

    jobs = collect_images([tmp_path / "mvtec"], tmp_path / "out")
    assert sorted(j.path.name for j in jobs) == ["000.PNG", "001.JPG", "002.PNG", "003.jpeg"]  # masks skipped


# ------------------------------------------------------------------------------ decompression bombs


def write_bomb(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A valid 8x8 PNG whose IHDR claims ``width`` x ``height`` (CRC corrected): tiny on disk, and
    PIL refuses it at open with DecompressionBombError, which is not an OSError."""
    Image.new("L", (8, 8), 128).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_a_bomb_is_one_unreadable_image_naming_the_file(tmp_path):
    bomb = write_bomb(tmp_path / "huge.png")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb)
    for read in (read_rgb, read_grey, read_size):
        with pytest.raises(UnreadableImage, match="400,000,000 pixels.*decompression bombs") as caught:
            read(bomb)
        assert caught.value.path == bomb and str(bomb) in str(caught.value)
    with pytest.raises(DataError, match=rf"Image {bomb} cannot be read \(its header declares"):
        load_image_tensor(bomb, SIZE, ZERO, ONE)
    with pytest.raises(DataError, match=rf"Image {bomb} cannot be read"):
        preprocess(bomb, SIZE, ZERO, ONE)
    image = tmp_path / "image.png"
    write_bomb(image, 8, 8)  # the same file at its true size: fine
    assert read_size(image) == (8, 8)
    with pytest.raises(DataError, match=rf"mask {bomb} cannot be read \(its header declares"):
        validate_samples([Sample(image, 1, "c", bomb, "d")])
    with pytest.raises(DataError, match=rf"Mask {bomb} of image {image} cannot be read"):
        AnomalyDataset([Sample(image, 1, "c", bomb, "d")], SIZE, ZERO, ONE)[0]


CLASS = "fabric"


@pytest.fixture(scope="module")
def bomb_data(tmp_path_factory, demo_root):
    """A copy of the demo data with one test/good image of CLASS replaced by a bomb."""
    root = tmp_path_factory.mktemp("bomb-data")
    shutil.copytree(demo_root / "test" / CLASS, root / CLASS)
    bomb = sorted((root / CLASS / "test" / "good").glob("*.png"))[0]
    write_bomb(bomb)
    return root, bomb


def test_train_on_a_bomb_is_one_paragraph_exit_2(tmp_path, demo_root, bomb_data):
    root, bomb = bomb_data
    res = aaclip("train", "base", "--recipe", "demo", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "-q",
                 *set_flags(f'data.train.root="{root}"', 'data.train.layout="mvtec"',
                            f'data.test.root="{demo_root / "test"}"', "stage1.epochs=1", "stage2.epochs=1"), cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    assert one_paragraph(res.stderr), res.stderr
    assert str(bomb) in res.stderr and "decompression bombs" in res.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_root):
    """One tiny run (one class, one epoch per stage) for `test` and `predict`."""
    work = tmp_path_factory.mktemp("modes-run")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    res = aaclip("train", "base", "--recipe", "demo", "--tracking-uri", uri, "-q",
                 *set_flags(f'data.train.root="{demo_root / "train"}"', f'data.test.root="{demo_root / "test"}"',
                        f'data.train.classes=["{CLASS}"]', f'data.test.classes=["{CLASS}"]',
                        "stage1.epochs=1", "stage2.epochs=1"), cwd=work, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return {"work": work, "uri": uri, "run": res.stdout.strip().splitlines()[-1]}


def test_test_on_a_bomb_is_one_paragraph_exit_2(trained, bomb_data):
    root, bomb = bomb_data
    res = aaclip("test", "--run", trained["run"], "--data-root", str(root), "--layout", "mvtec", "--dataset", "bombs",
                 "--tracking-uri", trained["uri"], "-q", cwd=trained["work"])
    assert res.returncode == 2, res.stderr[-3000:]
    assert one_paragraph(res.stderr), res.stderr
    assert str(bomb) in res.stderr and "decompression bombs" in res.stderr


def test_predict_scores_the_others_and_gives_the_bomb_an_error_row(trained, modes, tmp_path):
    inputs = tmp_path / "inputs" / CLASS
    inputs.mkdir(parents=True)
    for path in modes.values():
        shutil.copy(path, inputs / path.name)
    bomb = write_bomb(inputs / "huge.png")
    out = tmp_path / "out"
    res = aaclip("predict", "--run", trained["run"], str(inputs), "--out", str(out), "--class", CLASS,
                 "--tracking-uri", trained["uri"], "--json", cwd=trained["work"])
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert set(by_name) == {p.name for p in modes.values()} | {"huge.png"}
    assert str(bomb.resolve()) in by_name["huge.png"]["path"]
    assert "decompression bombs" in by_name["huge.png"]["error"] and by_name["huge.png"]["image_score"] is None
    for name, r in by_name.items():
        if name != "huge.png":
            assert r["error"] is None and np.isfinite(r["image_score"]) and Path(r["overlay"]).is_file(), name
