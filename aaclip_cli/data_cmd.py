"""`aaclip data synth|index`: the built-in demo data, and indexing a dataset in a known layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from aaclip_cli.app import AaclipCommand, JsonOpt, data_app, examples, handle_errors
from aaclip_cli.display import err, escape, out, print_json, print_result
from aaclip_core.names import LAYOUTS

LAYOUT_HELP = "Dataset layout: " + ", ".join(LAYOUTS) + "."


@data_app.command(
    "synth",
    cls=AaclipCommand,
    epilog=examples("aaclip data synth ./aaclip-demo-data", "aaclip data synth /tmp/demo --seed 1 --image-size 224"),
)
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
        return
    for name, c in counts.items():
        out().print(f"{name}: {c['images']} labelled images ({c['anomalous']} anomalous) in {escape(c['root'])}",
                    soft_wrap=True)


@data_app.command(
    "index",
    cls=AaclipCommand,
    epilog=examples("aaclip data index /data/mvtec_anomaly_detection",
                    "aaclip data index /data/VisA --layout visa --out visa.jsonl"),
)
@handle_errors
def data_index_cmd(
    root: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Dataset root.")],
    layout: Annotated[str, typer.Option("--layout", help=LAYOUT_HELP)] = "auto",
    out_file: Annotated[
        Optional[Path], typer.Option("--out", help="Write the reference JSON-lines metadata here.")
    ] = None,
    json_: JsonOpt = False,
):
    """Index a dataset: per split, class and defect type, with every image and mask checked."""
    from aaclip_core.data import index_dataset, write_metadata_jsonl
    from aaclip_core.data.summary import dataset_summary
    from aaclip_core.errors import DataError

    summary = dataset_summary(root, layout)
    problems = [p for s in summary["splits"].values() for p in s.get("problems", [])]
    if out_file is not None and not problems:
        samples = index_dataset(root, layout=summary["layout"], split="test")
        write_metadata_jsonl(samples, out_file, root.expanduser().resolve())
    if json_:
        print_json(summary)
    else:
        _print_dataset_summary(summary)
    if problems:
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        raise DataError(f"{len(problems)} problem(s) in {root}: {shown}. Fix or remove these files and re-run.")


def _print_dataset_summary(summary: dict) -> None:
    """The per-split tables on stdout (the result); what was not indexed and problems on stderr."""
    from rich.table import Table

    out().print(f"{escape(summary['root'])}: layout [bold]{escape(summary['layout'])}[/bold]", soft_wrap=True)
    for split, s in summary["splits"].items():
        if "absent" in s:
            err.print(f"[dim]{split} split: not indexed ({escape(s['absent'])})[/dim]", soft_wrap=True)
            continue
        table = Table(title=f"{split} split - {escape(s['role'])}", title_justify="left")
        for col in ("class", "normal", "anomalous", "masks", "defects"):
            table.add_column(col, justify="left" if col in ("class", "defects") else "right")
        for c, v in s["classes"].items():
            defects = ", ".join(f"{d} {n}" for d, n in v["defects"].items()) or "-"
            table.add_row(escape(c), str(v["normal"]), str(v["anomalous"]), str(v["masks"]), escape(defects))
        table.add_section()
        table.add_row(f"total ({len(s['classes'])} classes)", str(s["normal"]), str(s["anomalous"]),
                      str(sum(v["masks"] for v in s["classes"].values())), f"{len(s['defect_types'])} defect types")
        print_result(table)
        if s.get("problems"):
            err.print(f"[red]{len(s['problems'])} problem(s)[/red] in the {split} split", soft_wrap=True)
