"""The reference's and the fork's setting names (issue 17): one table, `--set OLD=value`, refusals
with a hint, `recipes show --aliases`."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from aaclip_cli.main import app
from aaclip_core.errors import ConfigError
from aaclip_core.recipe import Recipe, flatten, load_recipe
from aaclip_core.recipe_aliases import aliases, both_names

# The names users bring from the reference scripts and the fork, as the issue lists them.
KNOWN_OLD_NAMES = """image_cross_attn_weight text_cross_attn_weight cross_attn_heads cross_attn_dropout
cross_attn_start_loop num_feedback_loops text_epochs_per_loop image_epochs_per_loop epochs_decay_rate
lr_decay_per_loop warmup_epochs grad_clip text_lr image_lr text_epoch image_epoch text_batch_size
image_batch_size text_norm_weight text_adapt_weight image_adapt_weight text_adapt_until image_adapt_until
surgery_until_layer relu img_size shot seed model_name dataset load_base_text_adapter
load_base_image_adapter test_use_image_cross_attn""".split()

MAPPED = sorted(a.old for a in aliases().values() if a.settings)
UNMAPPED = sorted(a.old for a in aliases().values() if not a.settings)
RECIPE = "feedback"  # has every section the aliases point into


def test_every_known_name_is_in_the_table():
    assert set(KNOWN_OLD_NAMES) <= set(aliases())
    assert {"load_base_text_adapter", "load_base_image_adapter", "test_use_image_cross_attn", "dataset"} <= set(UNMAPPED)
    assert aliases()["image_cross_attn_weight"].settings == ("cross.image_weight",)
    assert aliases()["text_lr"].settings == ("stage1.lr", "feedback.text_lr")


def test_every_target_is_a_recipe_setting():
    settings = set(flatten(Recipe()))
    for old in MAPPED:
        for target in aliases()[old].settings:
            assert target in settings, f"{old} -> {target} is not a recipe setting"


def _other_value(value):
    """A valid value different from ``value`` (the default), as a --set literal."""
    if isinstance(value, bool):
        return str(not value).lower()
    if isinstance(value, int):
        return str(value + 1)
    if isinstance(value, float):
        return repr(value / 2)
    return '"ViT-B-16"'


def _lookup(recipe: Recipe, path: str):
    node = recipe
    for part in path.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("old", MAPPED)
def test_alias_sets_what_the_aaclip_namesets(old):
    default, _ = load_recipe(RECIPE)
    targets = aliases()[old].settings
    literal = _other_value(_lookup(default, targets[0]))
    via_alias, _ = load_recipe(RECIPE, [f"{old}={literal}"])
    via_name, _ = load_recipe(RECIPE, [f"{t}={literal}" for t in targets])
    assert via_alias.model_dump() == via_name.model_dump()
    for t in targets:
        assert _lookup(via_alias, t) != _lookup(default, t)


@pytest.mark.parametrize("old", UNMAPPED)
def test_names_without_counterpart_are_refused_with_what_to_use(old):
    with pytest.raises(ConfigError) as exc:
        load_recipe(RECIPE, [f"{old}=1"])
    assert f"'{old}' has no aaclip counterpart" in str(exc.value)
    assert aliases()[old].instead in str(exc.value)


def test_unmapped_name_is_refused_with_a_hint():
    with pytest.raises(ConfigError, match=r"'image_cross_weight': unknown key .*recipes show NAME --aliases"):
        load_recipe(RECIPE, ["image_cross_weight=1.0"])


def test_recipe_file_with_an_old_name_says_the_aaclip_name(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('extends = "cross"\nimage_cross_attn_weight = 1.0\n')
    with pytest.raises(ConfigError, match="'image_cross_attn_weight' is the reference/fork name of cross.image_weight"):
        load_recipe(str(path))


def test_both_names():
    assert both_names("cross.image_weight") == "cross.image_weight (image_cross_attn_weight)"
    assert both_names("eval.aupro") == "eval.aupro"


# ------------------------------------------------------------------------------------------ CLI


def test_set_with_an_old_name_says_once_what_it_set():
    result = CliRunner().invoke(app, ["recipes", "show", "cross", "--set", "image_cross_attn_weight=1.0",
                                      "--set", "image_cross_attn_weight=0.5", "--set", "text_lr=3e-5"])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("image_cross_attn_weight → cross.image_weight") == 1
    assert "text_lr → stage1.lr, feedback.text_lr" in result.stderr
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    shown = tomllib.loads(result.stdout)
    assert shown["cross"]["image_weight"] == 0.5 and shown["stage1"]["lr"] == 3e-05


def test_set_with_an_old_name_without_counterpart_exits_2():
    result = CliRunner().invoke(app, ["recipes", "show", "cross", "--set", "load_base_text_adapter=x.pth"])
    assert result.exit_code == 2
    assert "--base-text-adapter" in result.output and "Traceback" not in result.output


def test_recipes_show_aliases_lists_both_names():
    result = CliRunner().invoke(app, ["recipes", "show", "feedback", "--aliases"])
    assert result.exit_code == 0, result.output
    rows = {line.split(" = ")[0]: line for line in result.stdout.splitlines() if " = " in line}
    assert rows["cross.image_weight"].endswith("# image_cross_attn_weight")
    assert rows["feedback.text_lr"].endswith("# text_lr")
    assert "#" not in rows["eval.aupro"]
    assert "# test_use_image_cross_attn:" in result.stdout


def test_doctor_names_settings_by_both_names(tmp_path):
    import json

    result = CliRunner().invoke(app, ["doctor", "--json", "--recipe", "cross", "--set", "image_cross_attn_weight=1.0",
                                      "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert result.exit_code == 1, result.output  # the weight fails
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    check = checks["cross.image_weight"]
    assert check["status"] == "fail" and check["value"] == 1.0
    assert check["detail"].startswith("cross.image_weight (image_cross_attn_weight) = 1 >= 0.5")
    assert checks["cross.text_weight"]["detail"].startswith("cross.text_weight (text_cross_attn_weight) = 0.1")
