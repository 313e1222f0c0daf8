"""Indexing of every dataset layout, metadata round trips and validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aaclip_core.data import (
    Sample,
    detect_layout,
    index_dataset,
    select_classes,
    validate_samples,
    write_metadata_jsonl,
)
from aaclip_core.errors import ConfigError, DataError

SIZE = (12, 10)  # (width, height): non-square catches swapped axes


def write_image(path: Path, size: tuple[int, int] = SIZE, colour=(120, 80, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_mask(path: Path, size: tuple[int, int] = SIZE, anomalous: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0]), dtype=np.uint8)
    if anomalous:
        pixels[2:5, 3:7] = 255
    Image.fromarray(pixels).save(path)
    return path


def make_mvtec(root: Path, classes=("screw", "bottle")) -> Path:
    # Classes are created out of order so the test can check sorting.
    for cls in classes:
        write_image(root / cls / "train" / "good" / "000.png")
        write_image(root / cls / "train" / "good" / "001.png")
        write_image(root / cls / "test" / "good" / "001.png")
        write_image(root / cls / "test" / "good" / "000.png")
        write_image(root / cls / "test" / "scratch" / "000.png")
        write_mask(root / cls / "ground_truth" / "scratch" / "000_mask.png")
    (root / "license.txt").write_text("not a class")
    return root


def make_visa(root: Path) -> Path:
    rows = ["object,split,label,image,mask"]
    for cls in ("pcb3", "candle"):
        normal = f"{cls}/Data/Images/Normal/0000.JPG"
        anomaly = f"{cls}/Data/Images/Anomaly/0001.JPG"
        mask = f"{cls}/Data/Masks/Anomaly/0001.png"
        train = f"{cls}/Data/Images/Normal/0002.JPG"
        for rel in (normal, anomaly, train):
            write_image(root / rel)
        write_mask(root / mask)
        rows += [
            f"{cls},test,normal,{normal},",
            f"{cls},test,anomaly,{anomaly},{mask}",
            f"{cls},train,normal,{train},",
        ]
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.parent.mkdir(parents=True)
    csv_path.write_text("\n".join(rows) + "\n")
    return root


def make_btad(root: Path) -> Path:
    for cls, mask_ext in (("01", ".png"), ("03", ".bmp")):
        write_image(root / cls / "train" / "ok" / "0000.bmp")
        write_image(root / cls / "test" / "ok" / "0000.bmp")
        write_image(root / cls / "test" / "ko" / "0001.bmp")
        write_mask(root / cls / "ground_truth" / "ko" / f"0001{mask_ext}")
    return root


def make_folder(root: Path) -> Path:
    write_image(root / "widget" / "normal" / "a.png")
    write_image(root / "widget" / "anomaly" / "b.jpg")
    write_image(root / "widget" / "anomaly" / "c.png")
    write_mask(root / "widget" / "masks" / "b.png")
    return root


def make_jsonl(root: Path) -> Path:
    write_image(root / "imgs" / "n.png")
    write_image(root / "imgs" / "a.png")
    write_mask(root / "masks" / "a.png")
    records = [
        {"image_path": "imgs/n.png", "label": 0, "class_name": "gear", "mask_path": ""},
        {"image_path": "imgs/a.png", "label": 1, "class_name": "gear", "mask_path": "masks/a.png"},
    ]
    path = root / "full-shot.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    return path


# --------------------------------------------------------------------------- layouts


def test_mvtec_test_split_counts_labels_masks_and_order(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    samples = index_dataset(root, layout="mvtec")

    assert [(s.class_name, s.image_path.relative_to(root).as_posix()) for s in samples] == [
        ("bottle", "bottle/test/good/000.png"),
        ("bottle", "bottle/test/good/001.png"),
        ("bottle", "bottle/test/scratch/000.png"),
        ("screw", "screw/test/good/000.png"),
        ("screw", "screw/test/good/001.png"),
        ("screw", "screw/test/scratch/000.png"),
    ]
    anomalous = [s for s in samples if s.label == 1]
    assert [s.defect for s in anomalous] == ["scratch", "scratch"]
    assert anomalous[0].mask_path == root / "bottle" / "ground_truth" / "scratch" / "000_mask.png"
    assert all(s.mask_path is None and s.defect == "good" for s in samples if s.label == 0)
    assert all(s.image_path.is_absolute() for s in samples)
    validate_samples(samples)


def test_mvtec_train_split_is_all_normal(tmp_path):
    samples = index_dataset(make_mvtec(tmp_path / "mvtec"), layout="mvtec", split="train")
    assert len(samples) == 4
    assert {s.label for s in samples} == {0}
    assert all(
        s.image_path.parent.name == "good" and s.image_path.parent.parent.name == "train"
        for s in samples
    )


def test_mvtec_single_class_root_and_mpdd_alias(tmp_path):
    root = make_mvtec(tmp_path / "mpdd", classes=("tubes",))
    assert len(index_dataset(root / "tubes", layout="mvtec")) == 3
    assert index_dataset(root, layout="mpdd") == index_dataset(root, layout="mvtec")


def test_visa_reads_split_column_and_relative_paths(tmp_path):
    root = make_visa(tmp_path / "visa")
    test = index_dataset(root, layout="visa")
    train = index_dataset(root, layout="visa", split="train")

    assert [(s.class_name, s.label) for s in test] == [
        ("candle", 1),
        ("candle", 0),
        ("pcb3", 1),
        ("pcb3", 0),
    ]
    assert test[0].mask_path == root / "candle" / "Data" / "Masks" / "Anomaly" / "0001.png"
    assert [s.image_path.name for s in train] == ["0002.JPG", "0002.JPG"]
    assert {s.label for s in train} == {0}


def test_btad_masks_in_png_or_bmp(tmp_path):
    root = make_btad(tmp_path / "btad")
    test = index_dataset(root, layout="btad")
    assert [(s.class_name, s.label, s.defect) for s in test] == [
        ("01", 1, "ko"),  # paths sort "ko" before "ok"
        ("01", 0, "good"),
        ("03", 1, "ko"),
        ("03", 0, "good"),
    ]
    assert test[0].mask_path.suffix == ".png" and test[2].mask_path.suffix == ".bmp"
    assert len(index_dataset(root, layout="btad", split="train")) == 2


def test_folder_layout_masks_are_optional(tmp_path):
    root = make_folder(tmp_path / "plain")
    samples = index_dataset(root, layout="folder")
    by_name = {s.image_path.name: s for s in samples}
    assert by_name["a.png"].label == 0 and by_name["a.png"].mask_path is None
    assert (
        by_name["b.jpg"].label == 1
        and by_name["b.jpg"].mask_path == root / "widget" / "masks" / "b.png"
    )
    assert by_name["c.png"].label == 1 and by_name["c.png"].mask_path is None
    validate_samples(samples)


def test_folder_layout_has_no_train_split(tmp_path):
    with pytest.raises(DataError, match="'folder' layout has no 'train' split"):
        index_dataset(make_folder(tmp_path / "plain"), layout="folder", split="train")


def test_jsonl_from_file_or_directory(tmp_path):
    jsonl = make_jsonl(tmp_path / "ref")
    from_file = index_dataset(jsonl, layout="jsonl")
    from_dir = index_dataset(jsonl.parent)  # auto-detects full-shot.jsonl

    assert from_file == from_dir
    assert [(s.image_path.name, s.label) for s in from_file] == [("a.png", 1), ("n.png", 0)]
    assert from_file[0].mask_path == tmp_path / "ref" / "masks" / "a.png"
    assert from_file[1].mask_path is None


def test_write_metadata_jsonl_round_trips_with_relative_paths(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    samples = index_dataset(root)
    out = tmp_path / "meta" / "full-shot.jsonl"

    write_metadata_jsonl(samples, out, root)

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[2] == {
        "image_path": "bottle/test/scratch/000.png",
        "label": 1,
        "class_name": "bottle",
        "mask_path": "bottle/ground_truth/scratch/000_mask.png",
    }
    assert records[0]["mask_path"] == ""
    assert list(out.parent.iterdir()) == [out]  # the temp file was renamed, not left behind
    # Paths are relative to the dataset root, so a copy next to it indexes the same images.
    copy = root / "full-shot.jsonl"
    copy.write_text(out.read_text())
    reread = index_dataset(copy, layout="jsonl")
    assert [(s.image_path, s.label, s.class_name, s.mask_path) for s in reread] == [
        (s.image_path, s.label, s.class_name, s.mask_path) for s in samples
    ]


@pytest.mark.parametrize(
    ("maker", "expected"),
    [(make_mvtec, "mvtec"), (make_visa, "visa"), (make_btad, "btad"), (make_folder, "folder")],
)
def test_auto_detection(tmp_path, maker, expected):
    root = maker(tmp_path / "data")
    assert detect_layout(root) == expected
    assert index_dataset(root) == index_dataset(root, layout=expected)


def test_auto_detection_of_jsonl_file(tmp_path):
    assert detect_layout(make_jsonl(tmp_path / "ref")) == "jsonl"


# --------------------------------------------------------------------------- indexing errors


def test_missing_root_names_root_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere") as info:
        index_dataset(missing, layout="mvtec")
    assert "ground_truth" in str(info.value)


def test_unrecognised_layout_lists_what_was_looked_for(tmp_path):
    (tmp_path / "stuff" / "misc").mkdir(parents=True)
    with pytest.raises(DataError) as info:
        index_dataset(tmp_path / "stuff")
    message = str(info.value)
    assert str(tmp_path / "stuff") in message
    for hint in ("1cls.csv", "ground_truth", "ok|ko", "normal", "full-shot.jsonl"):
        assert hint in message


def test_empty_dataset_names_root_and_layout(tmp_path):
    (tmp_path / "empty" / "bottle" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no test images .*empty.* 'mvtec'"):
        index_dataset(tmp_path / "empty")


def test_mvtec_missing_mask_names_expected_mask(tmp_path):
    root = make_mvtec(tmp_path / "mvtec", classes=("bottle",))
    write_image(root / "bottle" / "test" / "crack" / "007.png")
    expected = root / "bottle" / "ground_truth" / "crack" / "007_mask.png"
    with pytest.raises(DataError, match=str(expected)):
        index_dataset(root)


def test_btad_missing_mask_names_expected_mask(tmp_path):
    root = make_btad(tmp_path / "btad")
    write_image(root / "01" / "test" / "ko" / "0009.bmp")
    with pytest.raises(DataError, match=r"ground_truth/ko/0009\.png"):
        index_dataset(root, layout="btad")


def test_jsonl_missing_image_names_file_and_line(tmp_path):
    jsonl = make_jsonl(tmp_path / "ref")
    (tmp_path / "ref" / "imgs" / "n.png").unlink()
    with pytest.raises(DataError, match=r"full-shot\.jsonl line 1 .*imgs/n\.png"):
        index_dataset(jsonl)


def test_jsonl_bad_record_and_label(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image_path": "x.png"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 1 .*not a valid metadata record"):
        index_dataset(path)
    write_image(tmp_path / "x.png")
    path.write_text('{"image_path": "x.png", "label": 2, "class_name": "c", "mask_path": ""}\n')
    with pytest.raises(DataError, match="label 2"):
        index_dataset(path)


def test_visa_bad_label_names_csv_line(tmp_path):
    root = make_visa(tmp_path / "visa")
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.write_text(csv_path.read_text().replace("test,normal", "test,ok", 1))
    with pytest.raises(DataError, match=r"1cls\.csv line 2 has label 'ok'"):
        index_dataset(root)


def test_invalid_layout_and_split_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="coco"):
        index_dataset(tmp_path, layout="coco")
    with pytest.raises(ConfigError, match="val"):
        index_dataset(tmp_path, split="val")


# --------------------------------------------------------------------------- class selection


def test_select_classes_keeps_requested_and_rejects_unknown(tmp_path):
    samples = index_dataset(make_mvtec(tmp_path / "mvtec"))
    assert {s.class_name for s in select_classes(samples, ["screw"])} == {"screw"}
    assert select_classes(samples, None) == samples
    with pytest.raises(DataError, match=r"widget.*Available classes: bottle, screw"):
        select_classes(samples, ["screw", "widget"])


# --------------------------------------------------------------------------- validation


def test_validate_rejects_empty_list():
    with pytest.raises(DataError, match="no images"):
        validate_samples([])


def test_validate_mask_size_mismatch_names_mask(tmp_path):
    image = write_image(tmp_path / "a.png")
    mask = write_mask(tmp_path / "a_mask.png", size=(8, 8))
    with pytest.raises(DataError, match=rf"mask {mask} is 8x8 pixels but image {image} is 12x10"):
        validate_samples([Sample(image, 1, "c", mask, "cut")])


def test_validate_normal_with_anomalous_mask_names_image(tmp_path):
    image = write_image(tmp_path / "n.png")
    mask = write_mask(tmp_path / "n_mask.png")
    with pytest.raises(DataError, match=rf"image {image} is labelled normal"):
        validate_samples([Sample(image, 0, "c", mask)])


def test_validate_anomalous_with_empty_mask_names_image(tmp_path):
    image = write_image(tmp_path / "a.png")
    mask = write_mask(tmp_path / "a_mask.png", anomalous=False)
    with pytest.raises(
        DataError, match=rf"image {image} is labelled anomalous but its mask .* all zero"
    ):
        validate_samples([Sample(image, 1, "c", mask, "cut")])


def test_validate_unreadable_and_missing_images(tmp_path):
    good = write_image(tmp_path / "good.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png body")
    missing = tmp_path / "missing.png"
    with pytest.raises(DataError) as info:
        validate_samples(
            [
                Sample(good, 0, "c", None),
                Sample(broken, 0, "c", None),
                Sample(missing, 0, "c", None),
            ]
        )
    message = str(info.value)
    assert f"image {broken} cannot be read" in message
    assert f"image {missing} does not exist" in message
    assert str(good) not in message


def test_validate_reports_first_problems_and_count(tmp_path):
    samples = [Sample(tmp_path / f"{i}.png", 0, "c", None) for i in range(5)]
    with pytest.raises(DataError, match=r"and 2 more problem"):
        validate_samples(samples)


def test_sample_rejects_label_outside_0_1(tmp_path):
    with pytest.raises(DataError, match="label 3"):
        Sample(tmp_path / "x.png", 3, "c", None)


def test_a_dataset_root_that_is_a_symlink_loop_is_named(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(DataError, match=rf"{loop} is a symbolic link that loops"):
        index_dataset(loop)


def test_a_visa_row_pointing_at_a_looping_symlink_is_named(tmp_path):
    root = make_visa(tmp_path / "visa")
    csv_path = root / "split_csv" / "1cls.csv"
    rows = csv_path.read_text(encoding="utf-8").splitlines()
    (root / "a").symlink_to(root / "b")
    (root / "b").symlink_to(root / "a")
    csv_path.write_text("\n".join([rows[0], "candle,test,normal,a,", *rows[1:]]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"visa/a is a symbolic link that loops"):
        index_dataset(root, layout="visa")


def test_a_class_folder_without_images_beside_others_is_named(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    (root / "widget" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match=r"Class folder .*widget has no test images"):
        index_dataset(root)
