"""AA-CLIP: residual adapters on a frozen OpenCLIP backbone (SPEC §2), plus the optional
cross-attention modules of the extension (SPEC §6).

The backbone is held but never trained; ``adapter_state_dict`` is the trainable state.
Every forward keeps each image's result independent of its batch-mates, except the ``official``
DPAM features, which reproduce the reference's batch mixing (SPEC §9).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from aaclip_core.errors import ConfigError
from aaclip_core.model.adapters import Adapter, Projection, norm_matched_mix, xavier_init_
from aaclip_core.model.blocks import block_forward
from aaclip_core.model.cross_attention import CrossAttention, ScaledCrossAttention
from aaclip_core.model.dpam import dpam_block_forward
from aaclip_core.recipe import CrossAttentionConfig, ModelConfig
from aaclip_core.record import Manifest, read_manifest

FROZEN_PREFIX = "clip."


@dataclass(frozen=True)
class Dims:
    vision_width: int
    vision_layers: int
    text_width: int
    text_layers: int
    embed_dim: int
    grid: int

    @classmethod
    def of(cls, clip: nn.Module) -> Dims:
        visual = clip.visual
        grid = visual.grid_size[0] if isinstance(visual.grid_size, tuple) else int(visual.grid_size)
        return cls(
            vision_width=visual.conv1.out_channels,
            vision_layers=len(visual.transformer.resblocks),
            text_width=clip.token_embedding.embedding_dim,
            text_layers=len(clip.transformer.resblocks),
            embed_dim=visual.proj.shape[1],
            grid=grid,
        )


CONTEXT_SOURCES = ("dpam", "image_path")


@dataclass(frozen=True)
class ModelModes:
    """The switches that change what a model computes without changing its tensors.

    ``text_cross`` / ``image_cross``: whether each cross-attention module (when present) takes
    part (feedback training keeps them off before ``cross_attn_start_loop``). ``context_source``:
    where the text cross-attention's image context and stage 1's image features come from, the
    frozen DPAM path (``dpam``) or, from feedback loop 2 on, the trained image path
    (``image_path``). Training and test use the same modes; a checkpoint's manifest records them.
    """

    text_cross: bool = False
    image_cross: bool = False
    context_source: str = "dpam"

    def __post_init__(self) -> None:
        if self.context_source not in CONTEXT_SOURCES:
            raise ConfigError(f"context source {self.context_source!r}: expected one of {', '.join(CONTEXT_SOURCES)}.")

    def as_dict(self) -> dict[str, Any]:
        return {"text_cross": self.text_cross, "image_cross": self.image_cross, "context_source": self.context_source}

    @classmethod
    def from_manifest(cls, meta: Mapping[str, Any] | Manifest) -> ModelModes:
        """The modes a checkpoint manifest records (older manifests too: :func:`~aaclip_core.record.read_manifest`)."""
        m = read_manifest(meta).model_modes()
        return cls(m["text_cross"], m["image_cross"], m["context_source"])


class AACLIP(nn.Module):
    def __init__(
        self,
        clip: nn.Module,
        cfg: ModelConfig,
        fidelity: str = "official",
        cross: CrossAttentionConfig | None = None,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.cfg = cfg
        self.fidelity = fidelity
        self.dims = d = Dims.of(clip)
        for field, value, depth, what in (
            ("model.levels", max(cfg.levels), d.vision_layers, "vision"),
            ("model.image_adapt_until", cfg.image_adapt_until, d.vision_layers, "vision"),
            ("model.surgery_until_layer", cfg.surgery_until_layer - 1, d.vision_layers, "vision"),
            ("model.text_adapt_until", cfg.text_adapt_until, d.text_layers, "text"),
        ):
            if value > depth:
                raise ConfigError(
                    f"{field} reaches block {value}, but {cfg.name} has {depth} {what} blocks; set {field} "
                    f"to fit (e.g. levels evenly spaced up to {d.vision_layers})."
                )
        # Block index (0-based) from which the stage-1 copy uses DPAM attention.
        self.dpam_start = max(0, d.vision_layers - (cfg.surgery_until_layer - 1))

        self.text_adapter = nn.ModuleList(
            [Adapter(d.text_width, d.text_width) for _ in range(cfg.text_adapt_until)]
            + [Projection(d.text_width, d.embed_dim, relu=True)]
        )
        self.image_adapter = nn.ModuleDict(
            {
                "layer_adapters": nn.ModuleList(
                    [Adapter(d.vision_width, d.vision_width) for _ in range(cfg.image_adapt_until)]
                ),
                "seg_proj": nn.ModuleList(
                    [Projection(d.vision_width, d.embed_dim, cfg.relu) for _ in cfg.levels]
                ),
                "det_proj": Projection(d.vision_width, d.embed_dim, cfg.relu),
            }
        )
        xavier_init_(self.text_adapter)
        xavier_init_(self.image_adapter)

        self.text_cross_attn: ScaledCrossAttention | None = None
        self.image_cross_attn: ScaledCrossAttention | None = None
        if cross is not None:
            self.text_cross_attn = ScaledCrossAttention(
                CrossAttention(d.text_width, d.embed_dim, d.text_width, cross.heads, cross.dropout),
                cross.text_weight,
                cross.learnable_weight,
            )
            self.image_cross_attn = ScaledCrossAttention(
                CrossAttention(d.vision_width, d.text_width, d.text_width, cross.heads, cross.dropout),
                cross.image_weight,
                cross.learnable_weight,
            )
        # The model's modes (see ModelModes), set only through `set_modes`.
        self.use_text_cross = cross is not None
        self.use_image_cross = cross is not None
        self.context_source = "dpam"
        self.tokenizer = open_clip.get_tokenizer(cfg.name)
        # The torch.compile'd adapted image forward, when `compile_image_path` was called.
        self._compiled_image_forward = None
        self._frozen_weights = False
        self._weights_stamp: tuple | None = None
        self._trained_parameters: list[nn.Parameter] = []

    def compile_image_path(self, backend: str = "inductor", freeze_weights: bool = False) -> None:
        """Run the adapted image forward (training, test, predict) through ``torch.compile``.

        Compilation happens on the first call for each input shape (and grad mode); results equal
        the eager forward within float tolerance. ``backend`` "aot_eager" traces without generating
        code (what the quick tests use).

        ``freeze_weights`` is for a model whose weights will not change again (test, predict):
        calls without autograd then run a graph with every weight folded in as a constant
        (inductor's freezing: on CPU the linear layers get prepacked weights and fused bias and
        activation, which the matrix products dominating a ViT-L forward gain from), and calls
        with autograd run eager. A weight changed after the first such call is an error, never a
        stale result."""
        self._compiled_image_forward = torch.compile(self._encode_image, backend=backend)
        self._frozen_weights = freeze_weights and backend == "inductor"
        self._weights_stamp = None
        # Only the trained tensors are checked: the backbone never changes, and listing its ~400
        # tensors on every call would cost ~2 ms, as much as a small GPU forward.
        self._trained_parameters = [p for n, p in self.named_parameters() if not n.startswith(FROZEN_PREFIX)]

    @property
    def compiled(self) -> bool:
        return self._compiled_image_forward is not None

    def _frozen_forward(self, *args):
        """The compiled forward with weights as constants (see ``compile_image_path``)."""
        from torch._inductor import config as inductor_config

        stamp = tuple((p.data_ptr(), p._version) for p in self._trained_parameters)
        if self._weights_stamp is None:
            self._weights_stamp = stamp
        elif stamp != self._weights_stamp:
            raise RuntimeError(
                "the model's weights changed after they were compiled into its frozen inference graph "
                "(compile_image_path(freeze_weights=True)); compile with frozen weights only once they are final."
            )
        with inductor_config.patch(freezing=True):
            return self._compiled_image_forward(*args)

    # ------------------------------------------------------------------ state

    @property
    def modes(self) -> ModelModes:
        return ModelModes(self.use_text_cross, self.use_image_cross, self.context_source)

    def set_modes(self, modes: ModelModes) -> None:
        """Switch the model's modes; cross-attention switched on needs the modules."""
        if (modes.text_cross or modes.image_cross) and self.text_cross_attn is None:
            raise ConfigError("cross-attention switched on for a model built without cross-attention modules.")
        self.use_text_cross, self.use_image_cross = modes.text_cross, modes.image_cross
        self.context_source = modes.context_source

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith(FROZEN_PREFIX)}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        own = self.adapter_state_dict()
        if strict:
            missing = sorted(set(own) - set(state))
            unexpected = sorted(set(state) - set(own))
            if missing or unexpected:
                raise KeyError(f"adapter state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for k, v in state.items():
            if k in own and own[k].shape != v.shape:
                raise ValueError(f"'{k}': expected shape {tuple(own[k].shape)}, found {tuple(v.shape)}")
        self.load_state_dict({**self.state_dict(), **state}, strict=True)

    def train(self, mode: bool = True) -> AACLIP:
        """Only the cross-attention modules ever enter training mode: the backbone's patch and
        attention dropout never act (SPEC §11)."""
        super().train(False)
        for m in (self.text_cross_attn, self.image_cross_attn):
            if m is not None:
                m.train(mode)
        self.training = mode
        return self

    @property
    def device(self) -> torch.device:
        return self.clip.visual.proj.device

    # ------------------------------------------------------------------ text

    def tokenize(self, sentences: list[str]) -> torch.Tensor:
        return self.tokenizer(sentences).to(self.device)

    @torch.no_grad()
    def text_prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens after the first (frozen) text block: cacheable, since nothing trained acts before it."""
        clip = self.clip
        n = tokens.shape[-1]
        x = clip.token_embedding(tokens) + clip.positional_embedding[:n]
        return block_forward(clip.transformer.resblocks[0], x, self._text_mask(n))

    def _text_mask(self, n: int) -> torch.Tensor | None:
        mask = self.clip.attn_mask
        return None if mask is None else mask[:n, :n]

    def _first_text_adapter(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.text_adapt_until >= 1:
            x = norm_matched_mix(x, self.text_adapter[0], self.cfg.text_adapt_weight)
        return x

    def text_context_tokens(self, prefix: torch.Tensor) -> torch.Tensor:
        """Prompt tokens after text block 1 + the first adapter, L2-normalised per token: the
        key/value context of the image cross-attention (not conditioned on any image)."""
        return F.normalize(self._first_text_adapter(prefix), dim=-1)

    def encode_text(
        self, tokens: torch.Tensor, prefix: torch.Tensor | None = None, image_context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Adapted text embeddings for ``tokens`` [..., L] -> [..., E].

        ``L`` may be shorter than the context length: attention is causal, so cutting the padding
        after the longest end-of-text token leaves every pooled embedding exactly as it was.

        With ``image_context`` [B, S, E] (text cross-attention on), ``tokens`` is [B, M, L]: the M
        prompts of row b are conditioned on image b alone, so no image sees its batch-mates.
        """
        clip = self.clip
        lead = tokens.shape[:-1]
        flat = tokens.reshape(-1, tokens.shape[-1])
        x = self.text_prefix(flat) if prefix is None else prefix.reshape(flat.shape[0], *prefix.shape[-2:])
        if image_context is not None and self.text_cross_attn is not None and self.use_text_cross:
            if tokens.dim() != 3 or tokens.shape[0] != image_context.shape[0]:
                raise ValueError("conditioned prompts must be [B, M, L] with one image context per row")
            x = self.text_cross_attn(x.view(*lead, *x.shape[-2:]), image_context).flatten(0, 1)
        x = self._first_text_adapter(x)
        mask = self._text_mask(flat.shape[-1])
        for i in range(1, self.dims.text_layers):
            x = block_forward(clip.transformer.resblocks[i], x, mask)
            if i < self.cfg.text_adapt_until:
                x = norm_matched_mix(x, self.text_adapter[i], self.cfg.text_adapt_weight)
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), flat.argmax(dim=-1)]
        return self.text_adapter[-1](x).view(*lead, -1)

    # ------------------------------------------------------------------ image

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.visual._embeds(images)

    def _patch_to_joint(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens (class token dropped) -> ln_post -> CLIP proj -> L2-normalised."""
        visual = self.clip.visual
        return F.normalize(visual.ln_post(tokens[:, 1:]) @ visual.proj, dim=-1)

    @torch.no_grad()
    def stage1_features(
        self, images: torch.Tensor, isolate: bool = False, first_level_only: bool = False
    ) -> list[torch.Tensor]:
        """Frozen stage-1 image features from the DPAM path (SPEC §3): per level, normalised patch
        tokens plus the normalised CLIP image embedding. The DPAM and ordinary paths share every
        block before ``dpam_start``, so that prefix runs once. ``isolate`` evaluates the official
        variant as if each image were alone (used outside stage-1 training). ``first_level_only``
        stops the DPAM path after the first level (the cross-attention context needs no more)."""
        blocks = self.clip.visual.transformer.resblocks
        mode = "tokens" if self.fidelity == "corrected" else ("self" if isolate else "batch")
        x = self._embed(images)
        wanted = self.cfg.levels[:1] if first_level_only else self.cfg.levels
        levels = set(wanted)
        out: dict[int, torch.Tensor] = {}
        for i in range(self.dpam_start):
            x = block_forward(blocks[i], x)
            if i + 1 in levels:
                out[i + 1] = self._patch_to_joint(x)
        ordinary, surgery = x, x
        last_needed = max(wanted)
        for i in range(self.dpam_start, len(blocks)):
            ordinary = block_forward(blocks[i], ordinary)  # the CLIP image embedding needs the full ordinary path
            if i < last_needed:
                surgery = dpam_block_forward(blocks[i], surgery, mode)
                if i + 1 in levels:
                    out[i + 1] = self._patch_to_joint(surgery)
        visual = self.clip.visual
        cls = F.normalize(visual.ln_post(ordinary[:, 0]) @ visual.proj, dim=-1)
        return [out[level] + cls.unsqueeze(1) for level in wanted]

    def encode_image(
        self, images: torch.Tensor, text_context: torch.Tensor | None = None, first_level_only: bool = False
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Adapted image path (SPEC §2): per-level normalised patch maps [B, P, E] and the
        detection embedding [B, E]. ``text_context`` [B, S, Dt] feeds the image cross-attention.
        ``first_level_only`` stops after the first level (no detection embedding)."""
        forward = self._compiled_image_forward
        if forward is None or torch.jit.is_tracing():  # exporters trace the eager forward
            forward = self._encode_image
        elif self._frozen_weights:
            forward = self._encode_image if torch.is_grad_enabled() else self._frozen_forward
        return forward(images, text_context, first_level_only)

    def _encode_image(
        self, images: torch.Tensor, text_context: torch.Tensor | None, first_level_only: bool
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        blocks = self.clip.visual.transformer.resblocks
        adapters = self.image_adapter["layer_adapters"]
        x = self._embed(images)
        levels = self.cfg.levels[:1] if first_level_only else self.cfg.levels
        tokens: list[torch.Tensor] = []
        for i in range(max(levels)):
            x = block_forward(blocks[i], x)
            if i == 0 and text_context is not None and self.image_cross_attn is not None and self.use_image_cross:
                x = self.image_cross_attn(x, text_context)
            if i < self.cfg.image_adapt_until:
                x = norm_matched_mix(x, adapters[i], self.cfg.image_adapt_weight)
            if i + 1 in levels:
                tokens.append(self.clip.visual.ln_post(x[:, 1:]))
        seg = [F.normalize(proj(t), dim=-1) for proj, t in zip(self.image_adapter["seg_proj"], tokens)]
        if first_level_only:
            return seg, None
        det = F.normalize(self.image_adapter["det_proj"](tokens[-1]), dim=-1).mean(dim=1)
        return seg, det

    @torch.no_grad()
    def image_path_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Stage-1 features from the trained image path (feedback loops >= 2), without gradient."""
        return self.encode_image(images)[0]

    @torch.no_grad()
    def anchor_context(self, images: torch.Tensor) -> torch.Tensor:
        """The text cross-attention's key/value context [B, P, E] for these images."""
        if self.context_source == "image_path":
            return self.encode_image(images, first_level_only=True)[0][0]
        return self.stage1_features(images, isolate=True, first_level_only=True)[0]

    @property
    def conditions_text(self) -> bool:
        """Whether text anchors depend on the image (text cross-attention present and on)."""
        return self.text_cross_attn is not None and self.use_text_cross


def build_model(
    recipe, device: torch.device | str = "cpu", with_cross: bool = False, final_weights: bool = False
) -> AACLIP:
    """Backbone + adapters for a recipe (cross-attention modules when ``with_cross``).

    ``final_weights``: the weights loaded next will not change again (a trained model for test or
    predict), so with ``runtime.compile`` its inference graph may hold them as constants."""
    from aaclip_core.model.backbone import build_clip

    clip = build_clip(recipe, device)
    model = AACLIP(clip, recipe.model, recipe.fidelity, recipe.cross if with_cross else None)
    model = model.to(device).eval()
    if recipe.runtime.compile:
        model.compile_image_path(freeze_weights=final_weights)
    return model
