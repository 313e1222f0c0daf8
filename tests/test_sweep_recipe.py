"""The recipe's [sweep] section: validated before anything runs, every refusal naming the key."""

from __future__ import annotations

import pytest

from aaclip_core.errors import ConfigError
from aaclip_core.recipe import SweepRange, load_recipe, recipe_hash, recipe_to_toml, with_settings


def _load(space: str, *more: str):
    return load_recipe("sweep-demo", [f"sweep.space={space}", *more])[0]


def test_the_demo_sweep_is_valid_and_round_trips_through_recipes_show(tmp_path):
    r = load_recipe("sweep-demo")[0]
    assert r.sweep.trials == 6 and r.sweep.objective == "pixel_auroc"
    assert r.sweep.space["cross.image_weight"] == SweepRange(low=0.02, high=1.0, log=True)
    assert r.sweep.space["feedback.cross_attn_start_loop"] == [1, 2]
    shown = recipe_to_toml(r)
    assert "[sweep.space]" in shown
    (tmp_path / "again.toml").write_text(shown)
    again = load_recipe(str(tmp_path / "again.toml"))[0]
    assert again.sweep == r.sweep


def test_a_recipe_without_a_sweep_keeps_its_hash_and_params():
    # A sweep section that is absent must not change what older runs recorded.
    r = load_recipe("feedback-demo")[0]
    assert "sweep" not in r.model_dump()
    assert recipe_hash(r) == recipe_hash(r.model_copy(update={"sweep": None}))


def test_reference_names_work_as_sweep_keys_and_set_the_setting():
    r = _load("{image_cross_attn_weight=[0.2, 0.7]}")
    trial = with_settings(r, {"image_cross_attn_weight": 0.7})
    assert trial.cross.image_weight == 0.7 and trial.sweep is None


@pytest.mark.parametrize("space, named", [
    ('{"stage2.lrr"={low=1e-4, high=1e-2}}', "'stage2.lrr' is not a setting"),
    ('{"sweep.trials"=[1, 2]}', "'sweep.trials' is not a setting"),
    ('{"stage2.lr"={low=1e-2, high=1e-4}}', "'stage2.lr': the range is empty"),
    ('{"stage2.lr"={low=1e-3, high=1e-3}}', "'stage2.lr': the range is empty"),
    ('{"stage2.lr"={low=0.0, high=1e-3, log=true}}', "'stage2.lr': log = true needs low above 0"),
    ('{"stage2.lr"={low=0.0, high=1e-3}}', "'stage2.lr': the value 0.0 is refused"),
    ('{"feedback.loops"={low=1, high=20}}', "'feedback.loops': the value 20 is refused"),
    ('{"feedback.loops"={low=1.0, high=3}}', "'feedback.loops' is a whole-number setting"),
    ('{"feedback.cross_attn_start_loop"=["a", 2]}', "'feedback.cross_attn_start_loop': the value 'a' is refused"),
    ('{"feedback.cross_attn_start_loop"=[1.5, 2]}', "'feedback.cross_attn_start_loop': the value 1.5"),
    ('{"runtime.compile"=[true, 1]}', "'runtime.compile': the choice 1 is of the wrong type"),
    ('{"data.train.root"={low=1, high=2}}', "'data.train.root': a range needs a numeric setting"),
    ('{"stage2.lr"=[]}', "'stage2.lr' has an empty list of choices"),
    ('{"stage2.lr"=0.1}', "'stage2.lr' must be a range"),
    ('{cross_attn_start_loop=[0, 1]}', "'cross_attn_start_loop': the value 0 is refused"),
])
def test_a_bad_space_is_refused_naming_the_key(space, named):
    with pytest.raises(ConfigError) as info:
        _load(space)
    msg = str(info.value)
    assert named in msg, msg
    assert "Traceback" not in msg and "\n" not in msg


def test_bad_sweep_settings_are_refused_before_anything_runs():
    with pytest.raises(ConfigError, match="sweep.sampler"):
        load_recipe("sweep-demo", ['sweep.sampler="bayes"'])
    with pytest.raises(ConfigError, match="sweep.objective"):
        load_recipe("sweep-demo", ['sweep.objective="test_auroc"'])
    with pytest.raises(ConfigError, match="sweep.from_run"):
        load_recipe("sweep-demo", ['sweep.train="cross"'])
    with pytest.raises(ConfigError, match="grace_seconds"):
        load_recipe("sweep-demo", ["sweep.heartbeat_seconds=60", "sweep.grace_seconds=30"])
