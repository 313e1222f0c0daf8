"""`aaclip predict`: score new images with a trained run (anomaly maps, image scores, verdicts)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from aaclip_score import options  # the option texts `aaclip-score` shares (standard library only)
from rich.table import Table

from aaclip_cli.app import AaclipCommand, JsonOpt, QuietOpt, UriOpt, app, examples, handle_errors
from aaclip_cli.display import RichReporter, err, escape, note, print_json, print_result

EXIT_IMAGE_ERRORS = options.EXIT_IMAGE_ERRORS
MAX_TABLE_ROWS = 50


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


@app.command(
    "predict",
    cls=AaclipCommand,
    epilog=examples(
        "aaclip predict --run RUN_ID photos/",
        "aaclip predict --model ./model photos/",
        "aaclip predict --model export/detector.onnx --threshold 0.5 --save-maps img1.png img2.png",
        "aaclip predict --model models:/bottle-detector@champion photos/",
    ),
)
@handle_errors
def predict_cmd(
    inputs: Annotated[
        list[Path], typer.Argument(exists=True, help=options.INPUTS_HELP)
    ],
    run: Annotated[Optional[str], typer.Option("--run", help="Run id whose model scores the images.")] = None,
    model: Annotated[
        Optional[Path],
        typer.Option("--model", help="A model folder (`aaclip export --format aaclip`) or an exported detector (.onnx "
                                     "or .pt from `aaclip export --format onnx|torchscript`) instead of a run: no "
                                     "tracking store needed (a detector file needs no training stack either); or a "
                                     "registered version, models:/NAME/VERSION or models:/NAME@ALIAS."),
    ] = None,
    calibration: Annotated[
        Optional[str],
        typer.Option("--calibration", help="The test whose calibration scales the scores: a test run id (or the test "
                                           "dataset's name). Needed when the images' dataset is ambiguous."),
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", help=options.OUT_HELP)
    ] = None,
    threshold: Annotated[
        Optional[str],
        typer.Option(
            "--threshold",
            help=options.THRESHOLD_HELP,
        ),
    ] = None,
    class_name: Annotated[
        Optional[str],
        typer.Option("--class", help=options.CLASS_HELP),
    ] = None,
    checkpoint: Annotated[
        Optional[str], typer.Option("--checkpoint", help="Checkpoint of the run (default: its selected one).")
    ] = None,
    save_maps: Annotated[
        bool, typer.Option("--save-maps", help=options.SAVE_MAPS_HELP)
    ] = False,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", help=options.BATCH_SIZE_HELP)
    ] = None,
    tracking_uri: UriOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Score images: image score, verdict, anomaly-map overlay PNG and predictions.jsonl.

    Scores are on the scale of the calibration's test (the test on the images' own dataset). Exit 1 when some image could not be scored."""
    result = _predict(inputs, run, model, calibration, out, threshold, class_name, checkpoint, save_maps, batch_size,
                      tracking_uri, quiet or json_)
    if json_:
        print_json(result)
    else:
        _print_predictions(f"run {run[:8]} checkpoint '{result['checkpoint']}'" if run else f"model {model}", result)
    if result["n_errors"]:
        if not json_:
            _print_errors(result)
        raise typer.Exit(EXIT_IMAGE_ERRORS)


def _predict(inputs, run, model, calibration, out, threshold, class_name, checkpoint, save_maps, batch_size,
             tracking_uri, quiet: bool) -> dict:
    """Score with an exported file (``--model FILE``) or with a run or model folder (``--run``, ``--model DIR``).
    Neither or both: `predict_images` says so."""
    from aaclip_core.errors import ConfigError

    if run is None and model is not None and str(model).startswith("models:"):
        if checkpoint is not None or calibration is not None:
            raise ConfigError("--checkpoint and --calibration apply to a run or a model folder; a registered version "
                              "holds one detector and its calibration (drop them).")
        from aaclip_core.jobs.register import predict_registered

        with RichReporter(quiet) as rep:
            return predict_registered(str(model), inputs, out, tracking_uri, threshold=threshold,
                                      class_name=class_name, save_maps=save_maps, batch_size=batch_size, reporter=rep)
    if run is None and model is not None and not model.is_dir():
        if checkpoint is not None or calibration is not None:
            raise ConfigError("--checkpoint and --calibration apply to a run or a model folder; an exported file holds "
                              "one model and its calibration (drop them).")
        from aaclip_core.deploy.predict import predict_with_file

        with RichReporter(quiet) as rep:
            return predict_with_file(model, inputs, out, threshold, class_name, save_maps, batch_size, rep)
    from aaclip_core.predict import predict_images

    with RichReporter(quiet) as rep:
        return predict_images(run, inputs, out, threshold, class_name, checkpoint, save_maps, batch_size, tracking_uri,
                              rep, model_dir=model, calibration=calibration)


def _print_errors(result: dict) -> None:
    """Each image that could not be scored, and why, on stderr."""
    err.print(f"[red]{result['n_errors']} image(s) could not be scored[/red]; the others were:")
    for r in result["rows"]:
        if r["error"]:
            err.print(f"  {r['path']}: {r['error']}", soft_wrap=True, markup=False)


def _print_predictions(title: str, result: dict) -> None:
    """The table of scores and verdicts on stdout; where the files went and how scores were
    calibrated on stderr."""
    rows = result["rows"]
    t = Table(title=escape(title))
    for col, justify in (("image", "left"), ("class", "left"), ("score", "right"), ("threshold", "right"),
                         ("verdict", "left")):
        t.add_column(col, justify=justify)
    for r in rows[:MAX_TABLE_ROWS]:
        verdict = escape(r["verdict"] or "-")
        if r["error"]:
            verdict = f"[red]error[/red]: {escape(r['error'])}"
        elif r["verdict"] == "anomalous":
            verdict = "[bold yellow]anomalous[/bold yellow]"
        t.add_row(escape(Path(r["path"]).name), escape(r["class_name"] or "-"), _fmt(r["image_score"]),
                  _fmt(r["threshold"]), verdict)
    print_result(t)
    if len(rows) > MAX_TABLE_ROWS:
        err.print(f"... and {len(rows) - MAX_TABLE_ROWS} more rows in {escape(str(result['predictions']))}")
    cal = result["calibration"]
    if cal:
        err.print(f"scores calibrated by the {escape(str(cal['dataset']))} test "
                  f"{cal['test_run_id'] or '(recorded in the folder)'}")
    elif result.get("calibration_note"):
        note(result["calibration_note"])
        if result["threshold"] is None:
            note("no verdicts without calibration: pass a numeric --threshold")
    err.print(
        f"{result['n_images']} images, {result['n_anomalous']} anomalous, {result['n_errors']} errors; "
        f"overlays in {escape(str(result['out_dir']))}, predictions in {escape(str(result['predictions']))}",
        soft_wrap=True,
    )
