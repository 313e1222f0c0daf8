"""`aaclip test`: evaluate a run; the results table on stdout (or one JSON document with --json)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from aaclip_cli.app import (
    AaclipCommand,
    JsonOpt,
    QuietOpt,
    SetOpt,
    UriOpt,
    app,
    examples,
    handle_errors,
    speaks_for_job,
)
from aaclip_cli.display import RichReporter, err, escape, note, print_json, print_result, results_table
from aaclip_core.names import LAYOUTS
from aaclip_core.record import Tag

LAYOUT_HELP = "Dataset layout: " + ", ".join(LAYOUTS) + "."


@app.command(
    "test",
    cls=AaclipCommand,
    epilog=examples(
        "aaclip test --run RUN_ID",
        "aaclip test --run RUN_ID --dataset MVTec --data-root /data/mvtec_anomaly_detection --json > report.json",
        "aaclip test --model ./model --dataset MVTec --data-root /data/mvtec_anomaly_detection",
    ),
)
@handle_errors
def test_cmd(
    run: Annotated[Optional[str], typer.Option("--run", help="Run id to evaluate.")] = None,
    model: Annotated[
        Optional[Path],
        typer.Option("--model", help="Model folder to evaluate instead of a run (no tracking store; the folder keeps "
                                     "the test's calibration)."),
    ] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="Test dataset name (class names).")] = None,
    data_root: Annotated[
        Optional[Path],
        typer.Option("--data-root", exists=True, file_okay=False, help="Test dataset root directory."),
    ] = None,
    layout: Annotated[Optional[str], typer.Option("--layout", help=LAYOUT_HELP)] = None,
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
    """Evaluate a run (or a model folder) with the reference protocol: per-class pixel/image AUROC and AP,
    plus AUPRO, F1-max."""
    from aaclip_core.errors import ConfigError

    if loop is not None and checkpoint is not None:
        raise ConfigError("Pass either --loop or --checkpoint, not both.")
    from aaclip_core.checkpoints.checkpoint import checkpoint_name
    from aaclip_core.jobs.test import test_run

    if loop is not None:
        checkpoint = checkpoint_name(loop, 2)

    root = str(data_root) if data_root is not None else None
    with RichReporter(quiet or json_) as rep:
        result = test_run(run, dataset, root, layout, checkpoint, same_dataset, tracking_uri, rep, set_,
                          visualize=visualize, model_dir=model)
    if not speaks_for_job():
        return
    if json_:
        print_json(result)
        return
    what = f"run {run[:8]}" if run else f"model {model}"
    title = (
        f"{result['dataset']} - {what} checkpoint '{result['checkpoint']}' "
        f"(stage {result['checkpoint_stage']}, epoch {result['checkpoint_epoch']})"
    )
    print_result(results_table(result, title))
    if result["same_dataset"]:
        note(f"tested on the training data ({result['same_dataset_reason']}); declared by "
             f"{result['same_dataset_declared_by']}; the test run is tagged {Tag.SAME_DATASET}=true.")
    if result.get("visualizations"):
        err.print(f"{len(result['visualizations'])} anomaly-map pictures logged under visualizations/<class>/")
    if result["run_id"] is None:
        err.print(f"calibration for {escape(result['dataset'])} recorded in the model folder "
                  f"{escape(str(result['model_dir']))}", soft_wrap=True)
        return
    err.print(f"test run {escape(result['run_id'])}")
