"""The CLI as a shell user meets it: version, help, completion, examples, flags shown as flags,
workflow order, recipes that print as reusable TOML, values reset with --set KEY=null, and user
paths with brackets kept intact in messages. None of these trains anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from aaclip_cli.main import app
from aaclip_core.recipe import load_recipe, recipe_to_toml, shipped_recipes


def _cli(*args, expect: int | None = 0):
    res = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    if expect is not None:
        assert res.exit_code == expect, (res.exit_code, res.stdout, res.stderr, res.exception)
    return res


def _commands(group=None, path=()):
    """(path, click command) for every leaf command of the app."""
    group = group or typer.main.get_command(app)
    ctx = typer.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if hasattr(cmd, "list_commands"):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def test_version():
    from aaclip_core.registry.tracking import aaclip_version

    for flag in ("--version", "-V"):
        assert _cli(flag).stdout == f"aaclip {aaclip_version()}\n"


def test_commands_are_listed_in_workflow_order():
    top = [line.split()[1] for line in _cli("-h").stdout.splitlines()
           if line.startswith("│ ") and len(line.split()) > 1 and line.split()[1].isalpha()]
    listed = [n for n in ("data", "recipes", "train", "test", "predict", "compare", "doctor", "import", "export")
              if n in top]
    assert listed == sorted(listed, key=top.index) and len(listed) == 9
    assert [n for n in top if n in listed] == ["data", "recipes", "train", "test", "predict", "compare", "doctor",
                                               "import", "export"]


def test_every_command_has_short_help_examples_and_flags_without_a_type():
    seen = 0
    for path, _ in _commands():
        text = _cli(*path, "-h").stdout
        assert "Examples:" in text and "$ aaclip " + path[0] in text, path
        assert "<bool>" not in text, (path, text)
        seen += 1
    assert seen >= 12
    assert "<bool>" not in _cli("-h").stdout


def test_defaults_are_shown():
    assert "[default: base]" in _cli("train", "base", "-h").stdout


def test_shell_completion_is_offered_and_completes_commands():
    text = _cli("-h").stdout
    assert "--install-completion" in text and "--show-completion" in text
    env = {"_AACLIP_COMPLETE": "complete_bash", "COMP_WORDS": "aaclip train fe", "COMP_CWORD": "2"}
    res = CliRunner().invoke(app, [], env=env, prog_name="aaclip")
    assert res.stdout.split() == ["feedback"]


def test_missing_input_path_is_a_usage_error_that_keeps_brackets(tmp_path):
    missing = tmp_path / "shots [2024]" / "a.png"
    res = _cli("predict", "--run", "0" * 32, missing, expect=2)
    assert str(missing) in res.stderr and "does not exist" in res.stderr


def test_error_messages_keep_bracketed_paths(tmp_path):
    folder = tmp_path / "recipes [v2]"
    folder.mkdir()
    recipe = folder / "bad [copy].toml"
    recipe.write_text('extends = "demo"\n[stage2]\nepochs = -1\n')
    res = _cli("train", "base", "--recipe", recipe, expect=2)
    message = " ".join(res.stderr.split())
    assert str(recipe) in message and "stage2.epochs" in message

    missing = tmp_path / "gone [1].toml"
    res = _cli("train", "base", "--recipe", missing, expect=2)
    assert str(missing) in " ".join(res.stderr.split())


@pytest.mark.parametrize("name", shipped_recipes())
def test_recipes_show_round_trips_through_a_file(name, tmp_path):
    text = _cli("recipes", "show", name).stdout
    path = tmp_path / f"{name}-copy.toml"
    path.write_text(text)
    original, copy = load_recipe(name)[0], load_recipe(str(path))[0]
    assert copy.model_dump(exclude={"extends"}) == original.model_dump(exclude={"extends"})
    assert "None" not in text and "False" not in text and "True" not in text


def test_recipes_show_with_overrides_round_trips(tmp_path):
    sets = ["model.quick_gelu=true", 'data.train.classes=["a[1]", "b"]', "stage2.betas=[0.9, 0.99]"]
    text = _cli("recipes", "show", "demo", *[x for s in sets for x in ("--set", s)]).stdout
    path = tmp_path / "copy.toml"
    path.write_text(text)
    assert load_recipe(str(path))[0].model_dump(exclude={"extends"}) == load_recipe("demo", sets)[0].model_dump(
        exclude={"extends"})


def test_set_null_resets_a_field_to_its_default():
    changed = load_recipe("demo", ["model.quick_gelu=true", "data.train.classes=[\"x\"]", "stage2.epochs=9"])[0]
    reset = load_recipe("demo", ["model.quick_gelu=true", "model.quick_gelu=null", "data.train.classes=null",
                                 "stage2.epochs=null"])[0]
    assert changed.model.quick_gelu is True
    assert reset.model.quick_gelu is None and reset.data.train.classes is None
    assert reset.stage2.epochs == type(reset.stage2)().epochs  # the built-in default, not the recipe's
    # A quoted "null" is the string.
    assert load_recipe("demo", ['tracking.experiment="null"'])[0].tracking.experiment == "null"


def test_recipe_to_toml_omits_nulls_and_keeps_lineage_as_a_comment():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    recipe = load_recipe("cross")[0]
    assert recipe.extends and recipe.model.quick_gelu is None
    text = recipe_to_toml(recipe)
    assert text.startswith(f"# recipe 'cross', layered on '{recipe.extends}'")
    data = tomllib.loads(text)
    assert "extends" not in data and "quick_gelu" not in data["model"]


_ROOT = Path(__file__).resolve().parent.parent  # the checkout: its packages, the scorer's in scorer/


def test_help_and_usage_errors_do_not_import_torch_or_mlflow():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from aaclip_cli.main import app\n"
        "for args in (['-h'], ['train', 'base', '--bogus'], ['train', 'base', '--set', 'nope=1'],"
        " ['import'], ['recipes', 'show', 'demo']):\n"
        "    CliRunner().invoke(app, args)\n"
        "print(sorted(m for m in ('torch', 'open_clip', 'mlflow') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(_ROOT), str(_ROOT / "scorer")])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("args, names", [
    (["train", "base", "--bogus"], ["--bogus", "aaclip train base -h"]),
    (["--bogus"], ["--bogus", "aaclip -h"]),
    (["train", "nope"], ["'nope'", "aaclip train -h"]),
    (["test", "--run"], ["--run", "requires an argument"]),
    (["predict", "--run", "0" * 32, "gone [1].png"], ["gone [1].png", "does not exist", "aaclip predict -h"]),
])
def test_usage_errors_are_one_paragraph_naming_the_flag(args, names, tmp_path):
    """Errors the argument parser finds read like aaclip's own: one paragraph on a piped stderr (no
    box, no colour codes), naming the flag or value and where the help is, exit 2."""
    from clirun import aaclip, one_paragraph

    res = aaclip(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert one_paragraph(res.stderr) and res.stderr.startswith("error: "), res.stderr
    assert "╭" not in res.stderr and "│" not in res.stderr
    text = " ".join(res.stderr.split())
    assert all(n in text for n in names), text
    assert res.stdout == ""


def test_train_commands_share_one_declaration_of_the_common_options():
    """`TrainFlags` is the one list: each `train` command has all of its options, after its own, with
    ``--recipe`` defaulting to the command's own recipe."""
    from dataclasses import fields

    from aaclip_cli.train_cmd import TrainFlags

    common = [f.name for f in fields(TrainFlags)]
    seen = 0
    for path, cmd in _commands():
        if path[0] != "train":
            continue
        names = [p.name for p in cmd.params if p.name != "help"]
        assert names[-len(common):] == common, (path, names)
        assert next(p for p in cmd.params if p.name == "recipe").default == path[1]
        seen += 1
    assert seen == 3


@pytest.mark.parametrize("command", ["base", "cross", "feedback"])
def test_train_common_options_reach_the_recipe(command, monkeypatch):
    """The values given travel to the recipe loader (stopped there: nothing is trained)."""
    from aaclip_cli import train_cmd
    from aaclip_core.errors import ConfigError

    def stop(*args):
        raise ConfigError(f"loader got {args!r}")

    monkeypatch.setattr(train_cmd, "load_recipe_with_flags", stop)
    res = _cli("train", command, "--recipe", "demo", "--set", "stage2.epochs=1", "--seed", "7",
               "--experiment", "x", expect=2)
    assert "loader got ('demo', ['stage2.epochs=1'], 7, 'x')" in " ".join(res.stderr.split())


@pytest.mark.parametrize("given", [["--run", "0" * 32, "--model", "detector.onnx"], []], ids=["both", "neither"])
def test_predict_needs_exactly_one_model(given, tmp_path):
    """Said by the library (`predict_images`), also for an exported file given with --run."""
    (tmp_path / "detector.onnx").write_bytes(b"")
    (tmp_path / "a.png").write_bytes(b"")
    args = [tmp_path / a if a == "detector.onnx" else a for a in given]
    res = _cli("predict", *args, tmp_path / "a.png", expect=2)
    text = " ".join(res.stderr.split())
    assert "predict needs a model: pass either --run RUN_ID or --model DIR|FILE (not both)." in text
