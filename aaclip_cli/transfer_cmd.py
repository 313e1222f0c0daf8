"""`aaclip import` and `aaclip export`: reference adapter files (text_adapter.pth,
image_adapter_N.pth) into and out of the run registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from aaclip_cli.app import (
    AaclipCommand,
    ExpOpt,
    JsonOpt,
    RecipeOpt,
    SetOpt,
    UriOpt,
    app,
    examples,
    handle_errors,
    load_recipe_with_flags,
)
from aaclip_cli.display import RichReporter, err, escape, note, print_json, warn
from aaclip_core.names import IMAGE_AUROC, PIXEL_AUROC
from aaclip_core.record import Tag

IMPORT_HELP = "\n\n".join(
    [
        "Register reference adapter files (text_adapter.pth, image_adapter_N.pth) as a run that "
        "test, train cross --from and train feedback --from take like any trained run.",
        "The files are read with torch.load(weights_only=True): a file that needs pickle is refused "
        "without running it. The run holds checkpoint 'final' (stage 'imported', epochs from the "
        "files) in aaclip's own format, the recipe it is evaluated with (backbone, fidelity) and each "
        "file's sha256 and epoch as params and tags.",
        "A text adapter alone is allowed: the image adapters keep the model's Xavier initialisation, "
        "seeded with the recipe's runtime.seed, and the run is tagged "
        f"{Tag.adapter('image_adapter')}=untrained. An image adapter alone needs --allow-image-only "
        f"(tagged {Tag.adapter('text_adapter')}=untrained).",
        "Projection variant: the image file's keys say whether it was trained with relu projections "
        "(seg_proj.N.fc.0.weight) or without (seg_proj.N.fc.weight). When that differs from the "
        "recipe's model.relu, the run's recipe adopts the file's variant and a warning says so.",
    ]
)

EXPORT_HELP = "\n\n".join(
    [
        "Write a run's checkpoint into DIR. --format reference (default): text_adapter.pth and "
        "image_adapter_{epoch}.pth. --format aaclip: a model folder (adapters.safetensors + manifest.json "
        "with recipe, modes and the calibrations of the run's tests) that `aaclip test --model DIR` and "
        "`aaclip predict --model DIR` load with no tracking store. --format onnx / torchscript: "
        "detector.onnx / detector.pt, one graph from image to anomaly map and image score, with "
        "detector.onnx.json / detector.pt.json beside it.",
        "reference: the keys text_adapter / image_adapter plus epoch in the reference module layout "
        "(projection variant as trained) and no optimiser state. Files of the same name in DIR are "
        "replaced. Checkpoints with cross-attention modules are refused: the format has no place for them.",
        "onnx / torchscript: backbone, adapters, each class's text anchors (computed per image inside the "
        "graph for cross-attention runs), the evaluation blur and up-sampling and the calibration "
        "`predict --run` would choose; inputs image [B, 3, S, S] (CLIP-normalised) and class_index [B]. The JSON holds "
        "classes, image size, mean/std, thresholds and provenance. Score with `aaclip predict --model FILE` "
        "(ONNX Runtime: pip install 'aaclip[deploy]'). --int8 also writes detector.int8.onnx, dynamically "
        "quantised, with its metric change on the run's test data in its JSON.",
    ]
)


@app.command(
    "import",
    cls=AaclipCommand,
    help=IMPORT_HELP,
    epilog=examples(
        "aaclip import --text-adapter text_adapter.pth --image-adapter image_adapter_20.pth",
        "aaclip import --text-adapter ckpt/text_adapter.pth --image-adapter ckpt/image_adapter_20.pth "
        "--set model.relu=true --name reference-visa",
    ),
)
@handle_errors
def import_cmd(
    text_adapter: Annotated[
        Optional[Path],
        typer.Option("--text-adapter", exists=True, dir_okay=False, help="Reference text_adapter.pth (stage 1)."),
    ] = None,
    image_adapter: Annotated[
        Optional[Path],
        typer.Option("--image-adapter", exists=True, dir_okay=False, help="Reference image_adapter_N.pth (stage 2)."),
    ] = None,
    allow_image_only: Annotated[
        bool,
        typer.Option("--allow-image-only", help="Allow --image-adapter alone (text anchors from untrained adapters)."),
    ] = False,
    recipe: RecipeOpt = "base",
    set_: SetOpt = None,
    name: Annotated[Optional[str], typer.Option("--name", help="MLflow run name.")] = None,
    tracking_uri: UriOpt = None,
    experiment: ExpOpt = None,
    json_: JsonOpt = False,
):
    """Register reference adapter files as a run (see IMPORT_HELP)."""
    from aaclip_core.jobs.import_rules import check_import_sources

    check_import_sources(text_adapter, image_adapter, allow_image_only)
    r, path = load_recipe_with_flags(recipe, set_, None, experiment)
    from aaclip_core.jobs.transfer import import_reference_run

    with RichReporter(json_) as rep:
        result = import_reference_run(r, path, text_adapter, image_adapter, allow_image_only, tracking_uri, rep, name)
    warn(*result["warnings"])
    if json_:
        print_json(result)
        return
    note(*result["notes"])
    parts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in result["status"].items())
    err.print(
        f"[green]imported[/green] run {result['run_id']} ({escape(parts)}; {escape(result['backbone'])}, "
        f"fidelity {result['fidelity']}, relu {str(result['relu']).lower()})",
        soft_wrap=True,
    )
    typer.echo(result["run_id"])


@app.command(
    "export",
    cls=AaclipCommand,
    help=EXPORT_HELP,
    epilog=examples("aaclip export --run RUN_ID reference-weights/",
                    "aaclip export --run RUN_ID --checkpoint stage1 out/"),
)
@handle_errors
def export_cmd(
    directory: Annotated[
        Path, typer.Argument(help="Directory to write text_adapter.pth and image_adapter_N.pth into.")
    ],
    run: Annotated[str, typer.Option("--run", help="Run id to export.")],
    checkpoint: Annotated[
        Optional[str], typer.Option("--checkpoint", help="Checkpoint of the run (default: its selected one).")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="reference (.pth files), aaclip (a model folder), onnx or torchscript "
                                           "(one scoring graph).")
    ] = "reference",
    classes: Annotated[
        Optional[list[str]],
        typer.Option("--class", help="onnx/torchscript: a class to bake in (repeatable; default: the run's "
                                     "tested and training classes)."),
    ] = None,
    int8: Annotated[
        bool, typer.Option("--int8", help="onnx: also write a dynamic int8 copy and measure its metric change.")
    ] = False,
    tracking_uri: UriOpt = None,
    json_: JsonOpt = False,
):
    """Write a run's checkpoint as reference files or one scoring graph (see EXPORT_HELP)."""
    from aaclip_core.jobs.export import GRAPH_FORMATS, export

    if fmt in GRAPH_FORMATS:
        with RichReporter(json_) as rep:
            result = export(fmt, run, directory, checkpoint, tracking_uri, rep, classes=classes, int8=int8)
        if json_:
            print_json(result)
            return
        if result["calibration_note"]:
            note(f"{result['calibration_note']}: the file scores on the raw scale")
        change = (result.get("int8") or {}).get("change")
        if change and change.get("delta_mean"):
            d = change["delta_mean"]
            err.print(f"int8 vs fp32 on {change['n_images']} test images: image AUROC {d[IMAGE_AUROC] * 100:+.2f}, "
                      f"pixel AUROC {d[PIXEL_AUROC] * 100:+.2f} points; image scores move by up to "
                      f"{change['max_abs_image_score_change']:.4f}")
        for f in result["files"]:
            err.print(f"wrote {f}")
            typer.echo(f)
        return
    if classes or int8:
        from aaclip_core.errors import ConfigError

        raise ConfigError(f"--class and --int8 apply to --format onnx / torchscript, not to --format {fmt}.")
    with RichReporter(json_) as rep:
        result = export(fmt, run, directory, checkpoint, tracking_uri, rep)
    if json_:
        print_json(result)
        return
    note(*result["notes"])
    for f in result["files"]:
        err.print(f"wrote {escape(str(f['path']))}", soft_wrap=True)
        typer.echo(f["path"])
