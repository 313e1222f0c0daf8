"""The detector as one traceable ``nn.Module``: preprocessed images and class indices in, raw and
calibrated anomaly maps and image scores out (SPEC §5, the evaluation protocol, on single images).

One graph serves every class of the run; the class is an input (an index into ``classes``), not a
file per class, because the backbone is almost all of the weights (ViT-L-14-336: ~1.7 GB) and a file
per class would store it once per class. What depends on the class is baked in as small per-class
tables that the graph indexes:

- text anchors [C, E, 2], computed once; or, when the text cross-attention conditions the anchors on
  the image, the class's prompt tokens after the frozen first text block, so that the graph computes
  each image's own anchors (the image's context, the conditioned text encoder, the anchors) exactly
  as `test` and `predict --run` do;
- the image cross-attention's text context [C, 16*77, D], when that module is on;
- the calibration: each class's map and detection ranges from its `test` run, which put a single
  image on the scale `test` reports (see `aaclip_core.predict`), applied by the post-processor
  (:mod:`aaclip_score.postprocess`). A class without calibration gets the identity ranges
  (0, 1), which turn the formula into the uncalibrated score of `predict`.

Every image is scored independently of its batch-mates, so the batch dimension is free.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from aaclip_score.postprocess import normalise, ranges_rows
from torch import nn

from aaclip_core.evaluation.protocol import raw_scores
from aaclip_core.model import AACLIP
from aaclip_core.prompts.anchors import AnchorBank
from aaclip_core.prompts.templates import anchors_from_embeddings


class DetectorGraph(nn.Module):
    """``forward(image [B, 3, S, S] normalised, class_index [B] int64)`` -> the four tensors of
    `contract.OUTPUT_NAMES`: raw_map, raw_det, map, score."""

    def __init__(
        self,
        model: AACLIP,
        bank: AnchorBank,
        calibration: Mapping[str, Mapping[str, float]],
        image_size: int,
        domain: str,
    ) -> None:
        super().__init__()
        model.eval()
        bank.freeze()
        self.model = model
        self.classes = list(bank.class_names)
        self.image_size = image_size
        self.domain = domain
        self.conditioned = model.conditions_text
        self.uses_text_context = model.image_cross_attn is not None and model.use_image_cross
        everyone = self.classes
        with torch.no_grad():
            if self.conditioned:
                self.register_buffer("tokens", bank.tokens.clone())
                self.register_buffer("prefix", bank.prefix.clone())
            else:
                self.register_buffer("anchors", bank.anchors(everyone).clone())
            if self.uses_text_context:
                self.register_buffer("text_context", bank.text_context(everyone).clone())
        ranges = ranges_rows(calibration, everyone)
        self.register_buffer("ranges", torch.tensor(ranges, dtype=torch.float32, device=model.device))

    def class_anchors(self, image: torch.Tensor, class_index: torch.Tensor) -> torch.Tensor:
        """[B, E, 2]: the class's anchors, or (text cross-attention on) the image's own anchors."""
        if not self.conditioned:
            return self.anchors[class_index]
        context = self.model.anchor_context(image)
        emb = self.model.encode_text(self.tokens[class_index], self.prefix[class_index], context)
        return anchors_from_embeddings(emb)

    def forward(self, image: torch.Tensor, class_index: torch.Tensor):
        anchors = self.class_anchors(image, class_index)
        text_context = self.text_context[class_index] if self.uses_text_context else None
        raw_map, raw_det = raw_scores(self.model, image, anchors, text_context, self.image_size, self.domain)
        # The post-processor itself, traced: the file scores exactly as `test` and `predict --run` do.
        nmap, score = normalise(raw_map, raw_det, self.ranges[class_index], self.domain)
        return raw_map, raw_det, nmap, score
