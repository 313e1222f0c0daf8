"""What the options of scoring mean, shared by `aaclip predict` and `aaclip-score` so the two
commands describe (and parse) them alike. Standard library only: aaclip's CLI builds its help from
these without loading numpy, PIL or ONNX Runtime."""

from __future__ import annotations

INPUTS_HELP = "Image files and/or folders (searched recursively)."
OUT_HELP = "Output folder (default: ./aaclip-predict-<run id[:8] or model>)."
THRESHOLD_HELP = (
    "Image-score threshold for the verdict: a number, or 'auto' for the F1-optimal threshold of the "
    "calibration: the test on the images' own dataset (default: auto when that test is unambiguous, else "
    "no verdict)."
)
# The exported file's calibration is the one its run's test gave; no choice to make.
FILE_THRESHOLD_HELP = (
    "Image-score threshold for the verdict: a number, or 'auto' for the F1-optimal threshold exported with "
    "the model (default: auto when the model was exported with a calibration, else no verdict)."
)
CLASS_HELP = (
    "Class of the images whose path does not tell it (a class is read from the dataset layout an image sits "
    "in - MVTec AD, VisA, BTAD, MPDD, <class>/normal|anomaly - or from a parent folder named after a known "
    "class)."
)
SAVE_MAPS_HELP = "Also save each raw anomaly map (float32 .npy, as `test` scores it)."
BATCH_SIZE_HELP = "Images per forward pass (default: the recipe's eval.batch_size)."
FILE_BATCH_SIZE_HELP = "Images per forward pass (default: the batch size recorded in the model's JSON, else 8)."
THREADS_HELP = "CPU threads ONNX Runtime may use (default: its own choice)."

# Exit codes: an image that could not be scored (the others were), and bad input.
EXIT_IMAGE_ERRORS = 1
EXIT_USAGE = 2
