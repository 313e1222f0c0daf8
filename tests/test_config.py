"""Recipes: validation, --set overrides and recipe resolution."""

from __future__ import annotations

import pytest

from aaclip_core.errors import ConfigError
from aaclip_core.recipe import (
    Recipe,
    apply_overrides,
    flatten,
    load_recipe,
    parse_override,
    recipe_from_dict,
    shipped_recipes,
)


def test_demo_recipe_loads_with_overrides(demo_recipe, demo_root):
    assert demo_recipe.name == "demo"
    assert demo_recipe.data.train.root == str(demo_root / "train")
    assert demo_recipe.stage2.lr == pytest.approx(1e-3)
    assert demo_recipe.model.levels == [1, 2, 3, 4]


def test_unknown_key_via_set_is_refused_naming_the_key(demo_overrides):
    with pytest.raises(ConfigError) as info:
        load_recipe("demo", [*demo_overrides, "stage2.lrr=0.1"])
    msg = str(info.value)
    assert "stage2.lrr" in msg and "unknown key" in msg


def test_unknown_key_in_file_is_refused(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('name = "x"\n[stage1]\nepochz = 3\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_recipe(str(path))
    assert "stage1.epochz" in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_top_level_table_is_refused():
    with pytest.raises(ConfigError, match="'trainer'"):
        recipe_from_dict({"trainer": {"epochs": 1}}, "test")


@pytest.mark.parametrize(
    "override,key",
    [
        ('stage2.epochs="many"', "stage2.epochs"),
        ("stage2.lr=-1", "stage2.lr"),
        ('fidelity="paper"', "fidelity"),
        ("model.levels=[]", "model.levels"),
        ("model.levels=[2, 1]", "model.levels"),
        ("model.text_adapt_weight=1.5", "model.text_adapt_weight"),
        ('data.domain="aerial"', "data.domain"),
    ],
)
def test_wrong_type_or_value_is_refused(override, key):
    with pytest.raises(ConfigError) as info:
        load_recipe("base", [override])
    assert key in str(info.value)


def test_valid_override_is_applied_and_typed():
    r, _ = load_recipe("base", ["stage2.epochs=3", "stage1.betas=[0.9, 0.99]", "model.relu=true"])
    assert r.stage2.epochs == 3
    assert r.stage1.betas == (0.9, 0.99)
    assert r.model.relu is True


@pytest.mark.parametrize(
    "text,key,value",
    [
        ("stage2.lr=1e-4", "stage2.lr", 1e-4),
        ("stage2.lr=0.5", "stage2.lr", 0.5),
        ("stage2.epochs=3", "stage2.epochs", 3),
        ("model.relu=true", "model.relu", True),
        ("model.relu=false", "model.relu", False),
        ("model.levels=[1,2,3]", "model.levels", [1, 2, 3]),
        ('data.train.root="/a b/c"', "data.train.root", "/a b/c"),
        ("data.train.root=/plain/path", "data.train.root", "/plain/path"),
        (" runtime.device = cpu ", "runtime.device", "cpu"),
        ("x=a=b", "x", "a=b"),
    ],
)
def test_parse_override(text, key, value):
    k, v = parse_override(text)
    assert k == key
    assert v == value and type(v) is type(value)


@pytest.mark.parametrize("text", ["stage2.lr", "=3", " = 3"])
def test_parse_override_malformed(text):
    with pytest.raises(ConfigError, match="--set"):
        parse_override(text)


def test_apply_overrides_nested_and_value_not_table():
    data = apply_overrides({"stage2": {"lr": 0.1}}, ["stage2.epochs=4", "data.train.root=x"])
    assert data == {"stage2": {"lr": 0.1, "epochs": 4}, "data": {"train": {"root": "x"}}}
    with pytest.raises(ConfigError, match="'lr' is a value"):
        apply_overrides({"stage2": {"lr": 0.1}}, ["stage2.lr.x=1"])


@pytest.mark.parametrize(
    "override,field",
    [
        ("model.levels=[1, 2, 3, 9]", "model.levels"),
        ("model.image_adapt_until=5", "model.image_adapt_until"),
        ("model.surgery_until_layer=7", "model.surgery_until_layer"),
        ("model.text_adapt_until=6", "model.text_adapt_until"),
    ],
)
def test_depth_beyond_tiny_backbone_refused(demo_overrides, override, field):
    with pytest.raises(ConfigError) as info:
        load_recipe("demo", [*demo_overrides, override])
    msg = str(info.value)
    assert field in msg and "exceeds" in msg and "4" in msg


def test_depth_at_the_limit_accepted(demo_overrides):
    r, _ = load_recipe("demo", [*demo_overrides, "model.image_adapt_until=4", "model.surgery_until_layer=5"])
    assert r.model.image_adapt_until == 4


def test_quick_gelu_follows_fidelity():
    assert Recipe().fidelity == "official" and Recipe().model.pretrained == "openai"
    assert Recipe().quick_gelu is False
    assert Recipe(fidelity="corrected").quick_gelu is True
    # Only the OpenAI weights were trained with QuickGELU.
    assert Recipe(fidelity="corrected", model={"pretrained": "none"}).quick_gelu is False
    # An explicit setting wins over the fidelity default.
    assert Recipe(model={"quick_gelu": True}).quick_gelu is True
    assert Recipe(fidelity="corrected", model={"quick_gelu": False}).quick_gelu is False


def test_unknown_recipe_name_lists_shipped():
    shipped = shipped_recipes()
    assert {"base", "demo"} <= set(shipped)
    with pytest.raises(ConfigError) as info:
        load_recipe("no-such-recipe-xyz")
    msg = str(info.value)
    assert "no-such-recipe-xyz" in msg
    for name in shipped:
        assert name in msg


def test_recipe_file_that_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere" / "mine.toml"
    with pytest.raises(ConfigError) as info:
        load_recipe(str(missing))
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_invalid_toml_is_refused(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[stage1\nepochs = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(str(path))


def test_recipe_file_path_loads(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\nfidelity = "corrected"\n[stage2]\nepochs = 2\n', encoding="utf-8")
    r, resolved = load_recipe(str(path), ["stage2.lr=0.01"])
    assert resolved == path
    assert (r.name, r.fidelity, r.stage2.epochs, r.stage2.lr) == ("mine", "corrected", 2, 0.01)
    assert r.stage1.epochs == 5  # defaults fill the rest


def test_directory_named_like_recipe_does_not_shadow_it(tmp_path, monkeypatch):
    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    r, _ = load_recipe("demo")
    assert r.name == "demo"


def test_flatten_gives_dotted_keys(demo_recipe):
    flat = flatten(demo_recipe)
    assert flat["stage2.lr"] == "0.001"
    assert flat["stage1.epochs"] == "3"
    assert flat["fidelity"] == "official"
    assert flat["model.levels"] == "[1, 2, 3, 4]"
    # The custom backbone config stays one value, not dozens of params.
    assert "model.custom_config" in flat
    assert not any(k.startswith("model.custom_config.") for k in flat)
    assert all(isinstance(v, str) for v in flat.values())


def test_every_shipped_recipe_is_valid():
    for name in shipped_recipes():
        r, path = load_recipe(name)
        assert path.stem == name
        assert r.fidelity in ("official", "corrected")


def test_levels_deeper_than_named_backbone_is_a_config_error(make_model, demo_recipe):
    from aaclip_core.errors import AaclipError
    from aaclip_core.model import AACLIP

    clip = make_model().clip
    cfg = demo_recipe.model.model_copy(update={"levels": [1, 2, 3, 9]})
    with pytest.raises(AaclipError, match="model.levels"):
        AACLIP(clip, cfg, demo_recipe.fidelity)


def test_extends_naming_a_missing_recipe_says_which_file_extends_it(tmp_path):
    child = tmp_path / "child.toml"
    child.write_text('extends = "no-such-parent"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"child\.toml' extends 'no-such-parent'"):
        load_recipe(str(child))
