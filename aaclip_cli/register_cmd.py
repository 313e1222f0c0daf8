"""`aaclip register`: a run's detector as a new version of a model in the MLflow Model Registry."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from aaclip_cli.app import AaclipCommand, JsonOpt, UriOpt, app, examples, handle_errors
from aaclip_cli.display import RichReporter, err, escape, print_json, warn

REGISTER_HELP = "\n\n".join(
    [
        "Export a run's detector as `aaclip export --format onnx` does, log it as an MLflow Model (pyfunc flavour, "
        "torch-free: numpy, Pillow, ONNX Runtime) linked to the run, and register it as a new version of NAME in "
        "the store's Model Registry. Prints the version's URI, models:/NAME/VERSION.",
        "The version's tags hold the source run, checkpoint, recipe hash, aaclip version, fp32 or int8, the "
        "calibration's test run, dataset and classes and that test's metrics. --alias moves an alias (e.g. "
        "champion) to the new version; `aaclip predict --model models:/NAME@champion` and "
        "`mlflow models serve -m models:/NAME@champion --env-manager local` then use it.",
        "A run that was never tested has no calibration: it is registered with raw scores, no thresholds and no "
        "verdicts (tag aaclip.calibrated=false, said in its description and here). Test it first for calibrated "
        "scores. Needs a database store or an MLflow server (MLflow refuses the ./mlruns file store).",
    ]
)


@app.command(
    "register",
    cls=AaclipCommand,
    help=REGISTER_HELP,
    epilog=examples(
        "aaclip register --run RUN_ID --name bottle-detector --alias champion",
        "aaclip register --run RUN_ID --name bottle-detector --int8 --json",
    ),
)
@handle_errors
def register_cmd(
    run: Annotated[str, typer.Option("--run", help="The training run to register (id or unique prefix).")],
    name: Annotated[str, typer.Option("--name", help="Registered model name (a new version is added).")],
    alias: Annotated[
        Optional[str], typer.Option("--alias", help="Move this alias (e.g. champion) to the new version.")
    ] = None,
    int8: Annotated[
        bool, typer.Option("--int8", help="Register the int8 (dynamically quantised) detector instead of fp32.")
    ] = False,
    checkpoint: Annotated[
        Optional[str], typer.Option("--checkpoint", help="Checkpoint of the run (default: its selected one).")
    ] = None,
    classes: Annotated[
        Optional[list[str]],
        typer.Option("--class", help="Classes to bake in (repeatable; default: the run's tested and training ones)."),
    ] = None,
    tracking_uri: UriOpt = None,
    json_: JsonOpt = False,
):
    """Register a run's detector in the MLflow Model Registry (see REGISTER_HELP)."""
    from aaclip_core.jobs.register import register_run

    with RichReporter(json_) as rep:
        result = register_run(run, name, alias, int8, checkpoint, classes, tracking_uri, rep)
    warn(*result["notes"])
    if json_:
        print_json(result)
        return
    alias_text = f", alias @{result['alias']}" if result["alias"] else ""
    err.print(f"[green]registered[/green] run {result['run_id']} as {escape(result['name'])} version "
              f"{result['version']} ({result['precision']}{alias_text})", soft_wrap=True)
    typer.echo(result["model_uri"])
