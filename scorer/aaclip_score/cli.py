"""``aaclip-score detector.onnx IMAGES... [--out DIR] [--threshold T] [--class NAME]``: score images
with an exported detector, writing the rows, overlay pictures and ``predictions.jsonl`` that
``aaclip predict --model detector.onnx`` writes, with numpy, Pillow and ONNX Runtime only.

Standard-library argparse, so the scorer needs nothing more. Exit 0 when every image was scored,
1 when some image could not be (an error row in its place, like ``aaclip predict``), 2 for bad
input (one paragraph on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aaclip_score import options
from aaclip_score.errors import AaclipError

PROG = "aaclip-score"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage errors as one paragraph, exit 2
        self.exit(options.EXIT_USAGE, f"error: {message} (usage: {self.format_usage().strip()[7:]}; "
                                      f"{self.prog} -h for help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Score images with an exported aaclip detector (`aaclip export --format onnx`), "
                "as `aaclip predict --model FILE` does: per image a score, threshold and verdict, an overlay PNG, "
                "and predictions.jsonl under --out.")
    p.add_argument("model", type=Path, help="The .onnx file `aaclip export` wrote (its .onnx.json beside it).")
    p.add_argument("inputs", type=Path, nargs="+", metavar="IMAGES", help=options.INPUTS_HELP)
    p.add_argument("--out", type=Path, default=None, help=options.OUT_HELP.replace("run id[:8] or ", ""))
    p.add_argument("--threshold", default=None, help=options.FILE_THRESHOLD_HELP)
    p.add_argument("--class", dest="class_name", default=None, help=options.CLASS_HELP)
    p.add_argument("--save-maps", action="store_true", help=options.SAVE_MAPS_HELP)
    p.add_argument("--batch-size", type=int, default=None, help=options.FILE_BATCH_SIZE_HELP)
    p.add_argument("--threads", type=int, default=None, help=options.THREADS_HELP)
    p.add_argument("--json", action="store_true", help="Print the summary with every row as JSON on stdout.")
    p.add_argument("-q", "--quiet", action="store_true", help="No progress or notes on stderr.")
    return p


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _print(result: dict, quiet: bool) -> None:
    for r in result["rows"]:
        verdict = f"error: {r['error']}" if r["error"] else (r["verdict"] or "-")
        print(f"{Path(r['path']).name}\t{r['class_name'] or '-'}\t{_fmt(r['image_score'])}\t{_fmt(r['threshold'])}\t"
              f"{verdict}")
    if not quiet:
        print(f"{result['n_images']} images, {result['n_anomalous']} anomalous, {result['n_errors']} errors; "
              f"overlays in {result['out_dir']}, predictions in {result['predictions']}", file=sys.stderr)


class _Notes:
    """The scorer's progress and notes on stderr (the reporter `predict_with_file` talks to)."""

    def info(self, message: str) -> None:
        print(message, file=sys.stderr)

    def eval_progress(self, done: int, total: int) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from aaclip_score.predict import predict_with_file

    try:
        result = predict_with_file(args.model, args.inputs, args.out, args.threshold, args.class_name, args.save_maps,
                                   args.batch_size, None if args.quiet or args.json else _Notes(),
                                   threads=args.threads)
    except AaclipError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return options.EXIT_USAGE
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result, args.quiet)
    if result["n_errors"]:
        if not args.json:
            for r in result["rows"]:
                if r["error"]:
                    print(f"  {r['path']}: {r['error']}", file=sys.stderr)
        return options.EXIT_IMAGE_ERRORS
    return 0


if __name__ == "__main__":
    sys.exit(main())
