"""`aaclip predict --model FILE`: the scorer's `predict_with_file` (`aaclip_score.predict`), with a
loader that runs TorchScript files too. Imports neither torch nor the dataset code: torch loads
only when a ``.pt`` file is scored."""

from __future__ import annotations

import functools

from aaclip_score.predict import predict_with_file as _predict_with_file

from aaclip_core.deploy.scorer import load_detector

predict_with_file = functools.partial(_predict_with_file, load=load_detector)
