"""`aaclip`: train, test, compare and diagnose AA-CLIP runs.

Every command prints human output on stderr and, with --json, one JSON document on stdout.
User errors print one paragraph and exit 2; an interrupted command exits 130.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import (
    ExpOpt,
    JsonOpt,
    QuietOpt,
    RecipeOpt,
    RunNameOpt,
    SeedOpt,
    SetOpt,
    UriOpt,
    app,
    data_app,
    handle_errors,
    load_recipe_with_flags,
    loss_summary,
    recipes_app,
    train_app,
)
from .display import RichReporter, err, print_json, results_table

# ------------------------------------------------------------------------------------------ train


@train_app.command("base")
@handle_errors
def train_base_cmd(
    recipe: RecipeOpt = "base",
    set_: SetOpt = None,
    seed: SeedOpt = None,
    tracking_uri: UriOpt = None,
    experiment: ExpOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    run_name: RunNameOpt = None,
):
    """Train base AA-CLIP: stage 1 (text anchors) then stage 2 (patch features)."""
    from aaclip_core.jobs.base import train_base

    r, path = load_recipe_with_flags(recipe, set_, seed, experiment)
    with RichReporter(quiet or json_) as rep:
        result = train_base(r, path, tracking_uri, rep, run_name)
    _report_trained(result, json_, f"base run {result['run_id']} ({loss_summary(result)})")


@train_app.command("cross")
@handle_errors
def train_cross_cmd(
    from_run: Annotated[Optional[str], typer.Option("--from", help="Base run id whose adapters to start from.")] = None,
    base_text_adapter: Annotated[
        Optional[Path], typer.Option("--base-text-adapter", help="Reference text_adapter.pth (instead of --from).")
    ] = None,
    base_image_adapter: Annotated[
        Optional[Path], typer.Option("--base-image-adapter", help="Reference image_adapter_N.pth (with the above).")
    ] = None,
    recipe: RecipeOpt = "cross",
    set_: SetOpt = None,
    seed: SeedOpt = None,
    tracking_uri: UriOpt = None,
    experiment: ExpOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    run_name: RunNameOpt = None,
):
    """Add text<->image cross-attention to a base run and train stage 1 and stage 2 once."""
    from aaclip_core.jobs.cross import train_cross

    r, path = load_recipe_with_flags(recipe, set_, seed, experiment)
    with RichReporter(quiet or json_) as rep:
        result = train_cross(r, path, from_run, base_text_adapter, base_image_adapter, tracking_uri, rep, run_name)
    _report_trained(result, json_, f"cross run {result['run_id']} ({loss_summary(result)})")


@train_app.command("feedback")
@handle_errors
def train_feedback_cmd(
    loops: Annotated[Optional[int], typer.Option("--loops", help="Number of loops, 1-10 (default: the recipe's).")] = None,
    from_run: Annotated[Optional[str], typer.Option("--from", help="Start from this run's adapters.")] = None,
    resume: Annotated[
        Optional[str], typer.Option("--resume", help="Continue an interrupted feedback run from its last stage.")
    ] = None,
    recipe: RecipeOpt = "feedback",
    set_: SetOpt = None,
    seed: SeedOpt = None,
    tracking_uri: UriOpt = None,
    experiment: ExpOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    run_name: RunNameOpt = None,
):
    """Feedback training: stage 1 and stage 2 alternate for N loops, each from what the last learned."""
    from aaclip_core.errors import ConfigError
    from aaclip_core.jobs.feedback import train_feedback

    if loops is not None and not 1 <= loops <= 10:
        raise ConfigError(f"--loops {loops}: feedback training runs 1 to 10 loops; pass a number in that range.")
    if resume:
        given = [flag for flag, value in (("--loops", loops), ("--set", set_), ("--seed", seed),
                                          ("--experiment", experiment), ("--from", from_run),
                                          ("--recipe", recipe if recipe != "feedback" else None)) if value]
        if given:
            raise ConfigError(
                f"--resume continues the run with its own recipe; drop {', '.join(given)} (to change "
                "settings, start a new run with --from RUN_ID instead)."
            )
        r, path = None, None
    else:
        sets = list(set_ or []) + ([f"feedback.loops={loops}"] if loops is not None else [])
        r, path = load_recipe_with_flags(recipe, sets, seed, experiment)
    with RichReporter(quiet or json_) as rep:
        result = train_feedback(r, path, from_run, resume, tracking_uri, rep, run_name)
    _report_trained(
        result, json_,
        f"feedback run {result['run_id']}: selected loop {result['selected_loop']} ({result['selection']})",
    )


def _report_trained(result: dict, as_json: bool, summary: str) -> None:
    """--json: the whole result on stdout; else a summary on stderr and the run id on stdout."""
    if as_json:
        print_json(result)
    else:
        err.print(f"[green]done[/green] {summary}")
        typer.echo(result["run_id"])


# ------------------------------------------------------------------------------------------ test


@app.command("test")
@handle_errors
def test_cmd(
    run: Annotated[str, typer.Option("--run", help="Run id to evaluate.")],
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="Test dataset name (class names).")] = None,
    data_root: Annotated[Optional[str], typer.Option("--data-root", help="Test dataset root directory.")] = None,
    layout: Annotated[
        Optional[str], typer.Option("--layout", help="auto, mvtec, visa, btad, mpdd, folder, jsonl.")
    ] = None,
    checkpoint: Annotated[
        Optional[str], typer.Option("--checkpoint", help="Checkpoint of the run (default: its selected one).")
    ] = None,
    loop: Annotated[
        Optional[int], typer.Option("--loop", help="Feedback runs: evaluate this loop's final checkpoint.")
    ] = None,
    same_dataset: Annotated[
        bool, typer.Option("--same-dataset", help="Allow testing on the training dataset (tagged).")
    ] = False,
    set_: SetOpt = None,
    tracking_uri: UriOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    visualize: Annotated[
        int,
        typer.Option(
            "--visualize",
            min=0,
            help="Log anomaly-map pictures of N images per class (the N highest-scoring anomalous and the N "
            "highest-scoring normal ones) under visualizations/<class>/.",
        ),
    ] = 0,
):
    """Evaluate a run with the reference protocol: per-class pixel/image AUROC and AP, plus AUPRO, F1-max."""
    from aaclip_core.errors import ConfigError
    from aaclip_core.jobs.test import test_run

    if loop is not None:
        if checkpoint is not None:
            raise ConfigError("Pass either --loop or --checkpoint, not both.")
        checkpoint = f"loop_{loop}_stage_2"
    with RichReporter(quiet or json_) as rep:
        result = test_run(run, dataset, data_root, layout, checkpoint, same_dataset, tracking_uri, rep, set_,
                          visualize=visualize)
    if json_:
        print_json(result)
        return
    title = (
        f"{result['dataset']} - run {run[:8]} checkpoint '{result['checkpoint']}' "
        f"(stage {result['checkpoint_stage']}, epoch {result['checkpoint_epoch']})"
    )
    err.print(results_table(result, title))
    if result["same_dataset"]:
        err.print(f"[yellow]note:[/yellow] tested on the training data ({result['same_dataset_reason']}); declared "
                  f"by {result['same_dataset_declared_by']}; the test run is tagged aaclip.same_dataset=true.",
                  soft_wrap=True)
    if result.get("visualizations"):
        err.print(f"{len(result['visualizations'])} anomaly-map pictures logged under visualizations/<class>/")
    err.print(f"test run {result['run_id']}")
    typer.echo(result["run_id"])


# ------------------------------------------------------------------------------------------ data


@data_app.command("synth")
@handle_errors
def data_synth_cmd(
    directory: Annotated[Path, typer.Argument(help="Where to write the demo dataset (train/ and test/ roots).")],
    seed: Annotated[int, typer.Option("--seed", help="Generation seed.")] = 0,
    image_size: Annotated[int, typer.Option("--image-size", help="Image side in pixels.")] = 128,
    json_: JsonOpt = False,
):
    """Write the built-in synthetic demo dataset in the MVTec AD layout (deterministic for a seed)."""
    from aaclip_core.data import ensure_demo_data, index_dataset

    train, test = ensure_demo_data(directory, seed=seed, image_size=image_size)
    counts = {}
    for name, root in (("train", train), ("test", test)):
        samples = index_dataset(root, layout="mvtec", split="test")
        counts[name] = {"root": str(root), "images": len(samples), "anomalous": sum(s.label for s in samples)}
    if json_:
        print_json(counts)
    else:
        for name, c in counts.items():
            err.print(f"{name}: {c['images']} labelled images ({c['anomalous']} anomalous) in {c['root']}")


@data_app.command("index")
@handle_errors
def data_index_cmd(
    root: Annotated[Path, typer.Argument(help="Dataset root.")],
    layout: Annotated[str, typer.Option("--layout", help="auto, mvtec, visa, btad, mpdd, folder, jsonl.")] = "auto",
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the reference JSON-lines metadata here.")] = None,
    json_: JsonOpt = False,
):
    """Index a dataset: per split, class and defect type, with every image and mask checked."""
    from aaclip_core.data import index_dataset, write_metadata_jsonl
    from aaclip_core.data.summary import dataset_summary
    from aaclip_core.errors import DataError

    summary = dataset_summary(root, layout)
    problems = [p for s in summary["splits"].values() for p in s.get("problems", [])]
    if out is not None and not problems:
        samples = index_dataset(root, layout=summary["layout"], split="test")
        write_metadata_jsonl(samples, out, root.expanduser().resolve())
    if json_:
        print_json(summary)
    else:
        _print_dataset_summary(summary)
    if problems:
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        raise DataError(f"{len(problems)} problem(s) in {root}: {shown}. Fix or remove these files and re-run.")


def _print_dataset_summary(summary: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    err.print(f"{escape(summary['root'])}: layout [bold]{summary['layout']}[/bold]", soft_wrap=True)
    for split, s in summary["splits"].items():
        if "absent" in s:
            err.print(f"[dim]{split} split: not indexed ({escape(s['absent'])})[/dim]", soft_wrap=True)
            continue
        table = Table(title=f"{split} split - {s['role']}", title_justify="left")
        for col in ("class", "normal", "anomalous", "masks", "defects"):
            table.add_column(col, justify="left" if col in ("class", "defects") else "right")
        for c, v in s["classes"].items():
            defects = ", ".join(f"{d} {n}" for d, n in v["defects"].items()) or "-"
            table.add_row(escape(c), str(v["normal"]), str(v["anomalous"]), str(v["masks"]), escape(defects))
        table.add_section()
        table.add_row(f"total ({len(s['classes'])} classes)", str(s["normal"]), str(s["anomalous"]),
                      str(sum(v["masks"] for v in s["classes"].values())), f"{len(s['defect_types'])} defect types")
        err.print(table)
        if s.get("problems"):
            err.print(f"[red]{len(s['problems'])} problem(s)[/red] in the {split} split", soft_wrap=True)


# ------------------------------------------------------------------------------------------ recipes


@recipes_app.command("list")
@handle_errors
def recipes_list_cmd():
    """List the shipped recipes."""
    from aaclip_core.config import load_recipe, shipped_recipes

    for name in shipped_recipes():
        r, _ = load_recipe(name)
        typer.echo(f"{name:16s} {r.description}")


@recipes_app.command("show")
@handle_errors
def recipes_show_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe name or path.")] = "base",
    set_: SetOpt = None,
):
    """Print every setting of a recipe (after --set overrides) as dotted keys."""
    from aaclip_core.config import flatten, load_recipe

    r, _ = load_recipe(recipe, set_)
    for k, v in flatten(r).items():
        typer.echo(f"{k} = {v}")


# Command modules register themselves on `app` when imported.
from . import commands_extra  # noqa: E402,F401


def main() -> None:  # pragma: no cover - entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
