"""Text anchors per class, with the frozen part of the prompt encoding done once (SPEC §2)."""

from __future__ import annotations

import torch

from aaclip_core import distributed
from aaclip_core.model import AACLIP
from aaclip_core.prompts.names import PromptName, PromptNamer
from aaclip_core.prompts.templates import N_PROMPTS, anchors_from_embeddings, class_prompts


class AnchorBank:
    """Each class's 16 prompt tokens and their frozen first-block outputs.

    ``anchors`` recomputes the trainable part on demand (stage 1 needs the gradient); ``freeze``
    caches per-class anchors for stage 2 and test when they do not depend on the image.
    """

    def __init__(self, model: AACLIP, class_names: list[str], names: PromptNamer | str) -> None:
        """``names`` chooses each class's prompt name; a dataset name means that dataset's default
        names (the reference's table, else the folder name)."""
        self.model = model
        self.class_names = sorted(set(class_names))
        self.index = {c: i for i, c in enumerate(self.class_names)}
        self.namer = names if isinstance(names, PromptNamer) else PromptNamer(names)
        self.prompt_names: dict[str, PromptName] = {c: self.namer.resolve(c) for c in self.class_names}
        self.descriptive = {c: p.name for c, p in self.prompt_names.items()}
        sentences = [s for c in self.class_names for s in class_prompts(self.descriptive[c])]
        full = model.tokenize(sentences)
        self.full_tokens = full.view(len(self.class_names), N_PROMPTS, -1)
        # Only positions up to the last end-of-text token can reach a pooled embedding (causal
        # attention), so anchors are encoded on that prefix: ~6x less text work for CLIP prompts.
        length = int(full.argmax(dim=-1).max()) + 1
        self.tokens = self.full_tokens[..., :length]
        self.prefix = model.text_prefix(self.tokens.flatten(0, 1)).view(*self.tokens.shape, -1)
        self._context_prefix: torch.Tensor | None = None
        self._frozen: torch.Tensor | None = None
        self._frozen_text_context: torch.Tensor | None = None

    def record(self) -> dict:
        """The names in force, as a checkpoint manifest records them."""
        return self.namer.record(self.class_names)

    def class_index(self, class_names: list[str]) -> torch.Tensor:
        try:
            return torch.tensor([self.index[c] for c in class_names], device=self.tokens.device)
        except KeyError as exc:
            raise KeyError(f"class {exc} has no anchors (known: {self.class_names})") from None

    def anchors(self, class_names: list[str], image_context: torch.Tensor | None = None) -> torch.Tensor:
        """[B, E, 2] anchors for a batch; per image when the model conditions text on the image."""
        idx = self.class_index(class_names)
        if self.model.conditions_text:
            if image_context is None:
                raise ValueError("this model's anchors depend on the image: pass image_context")
            emb = self.model.encode_text(self.tokens[idx], self.prefix[idx], image_context)
            return anchors_from_embeddings(emb)
        if self._frozen is not None:
            return self._frozen[idx]
        uniq, inverse = idx.unique(return_inverse=True)
        emb = self.model.encode_text(self.tokens[uniq], self.prefix[uniq])
        return anchors_from_embeddings(emb)[inverse]

    @torch.no_grad()
    def freeze(self) -> None:
        """Cache the per-class anchors (only meaningful when they do not depend on the image).

        Under torchrun rank 0 computes them and every rank receives the same tensors."""
        self._frozen = None
        self._frozen_text_context = None
        cached = None
        if distributed.is_main():
            cached = {}
            if self.model.image_cross_attn is not None:
                # The first text adapter is frozen wherever anchors are: its tokens are computed once.
                cached["text_context"] = self._text_context_of(torch.arange(len(self.class_names)))
            if not self.model.conditions_text:
                cached["anchors"] = anchors_from_embeddings(self.model.encode_text(self.tokens, self.prefix))
            if distributed.active():
                cached = {k: v.cpu() for k, v in cached.items()}
        cached = distributed.broadcast_object(cached)
        device = self.tokens.device
        if "text_context" in cached:
            self._frozen_text_context = cached["text_context"].to(device)
        if "anchors" in cached:
            self._frozen = cached["anchors"].to(device)

    def unfreeze(self) -> None:
        self._frozen = None
        self._frozen_text_context = None

    @torch.no_grad()
    def text_context(self, class_names: list[str]) -> torch.Tensor:
        """[B, 16*77, D] prompt tokens (full context length, as specified) of each image's class for
        the image cross-attention."""
        idx = self.class_index(class_names)
        if self._frozen_text_context is not None:
            return self._frozen_text_context[idx]
        return self._text_context_of(idx)

    @torch.no_grad()
    def _text_context_of(self, idx: torch.Tensor) -> torch.Tensor:
        if self._context_prefix is None:
            self._context_prefix = self.model.text_prefix(self.full_tokens.flatten(0, 1)).view(
                *self.full_tokens.shape, -1
            )
        return self.model.text_context_tokens(self._context_prefix[idx.to(self._context_prefix.device)]).flatten(1, 2)
