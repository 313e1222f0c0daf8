"""The reference AA-CLIP's adapter files, key for key, written down once from the reference's own code.

Source: the public AA-CLIP code, read in its GitHub copies zhuguli-diu/AA-CLIP (``model/adapter.py`` and
``model/adapter_modules.py`` at commit a490ee5) and wei-paul/AA-CLIP (``train.py`` at commit ecb6bd3):

- ``model/adapter_modules.py``: ``SimpleAdapter(c_in, c_out)`` is ``fc = Sequential(Linear(c_in, c_out,
  bias=False), LeakyReLU())``; ``SimpleProj(c_in, c_out, relu)`` is that Sequential when ``relu``, else
  a bare ``fc = Linear(c_in, c_out, bias=False)``.
- ``model/adapter.py``, ``AdaptedCLIP.__init__`` (ViT-L-14-336: vision width 1024, text width and
  embedding 768): ``text_adapter = ModuleList([SimpleAdapter(768, 768)] * text_adapt_until +
  [SimpleProj(768, 768, relu=True)])``; ``image_adapter = ModuleDict({"layer_adapters":
  [SimpleAdapter(1024, 1024)] * image_adapt_until, "seg_proj": [SimpleProj(1024, 768, relu)] *
  len(levels), "det_proj": SimpleProj(1024, 768, relu)})``.
- ``train.py``: ``torch.save({"epoch": epoch + 1, "text_adapter": model.text_adapter.state_dict(),
  "text_optimizer": optimizer.state_dict()}, "text_adapter.pth")`` and ``{"epoch", "image_adapter",
  "image_optimizer"}`` to ``image_adapter.pth`` and ``image_adapter_{epoch + 1}.pth``; ``--relu`` is a
  store_true flag (off unless given), ``text_adapt_until`` 3, ``image_adapt_until`` 6, 4 levels.

These literal lists are what the reference writes with its defaults. aaclip's keys are never used to
build them: a fixture made by stripping aaclip's own prefixes would agree with aaclip whatever it did.
"""

from __future__ import annotations

import torch

# text_adapter.pth["text_adapter"]: 3 adapters, then the projection (always the relu variant).
REFERENCE_TEXT_ADAPTER = {
    "0.fc.0.weight": (768, 768),
    "1.fc.0.weight": (768, 768),
    "2.fc.0.weight": (768, 768),
    "3.fc.0.weight": (768, 768),
}

# image_adapter_N.pth["image_adapter"], --relu off (the reference default).
REFERENCE_IMAGE_ADAPTER = {
    "layer_adapters.0.fc.0.weight": (1024, 1024),
    "layer_adapters.1.fc.0.weight": (1024, 1024),
    "layer_adapters.2.fc.0.weight": (1024, 1024),
    "layer_adapters.3.fc.0.weight": (1024, 1024),
    "layer_adapters.4.fc.0.weight": (1024, 1024),
    "layer_adapters.5.fc.0.weight": (1024, 1024),
    "seg_proj.0.fc.weight": (768, 1024),
    "seg_proj.1.fc.weight": (768, 1024),
    "seg_proj.2.fc.weight": (768, 1024),
    "seg_proj.3.fc.weight": (768, 1024),
    "det_proj.fc.weight": (768, 1024),
}

# image_adapter_N.pth["image_adapter"], --relu on: the projections are Sequentials.
REFERENCE_IMAGE_ADAPTER_RELU = {
    "layer_adapters.0.fc.0.weight": (1024, 1024),
    "layer_adapters.1.fc.0.weight": (1024, 1024),
    "layer_adapters.2.fc.0.weight": (1024, 1024),
    "layer_adapters.3.fc.0.weight": (1024, 1024),
    "layer_adapters.4.fc.0.weight": (1024, 1024),
    "layer_adapters.5.fc.0.weight": (1024, 1024),
    "seg_proj.0.fc.0.weight": (768, 1024),
    "seg_proj.1.fc.0.weight": (768, 1024),
    "seg_proj.2.fc.0.weight": (768, 1024),
    "seg_proj.3.fc.0.weight": (768, 1024),
    "det_proj.fc.0.weight": (768, 1024),
}

def reference_layout(kind: str, relu: bool = False, image_adapt_until: int = 6, text_adapt_until: int = 3,
                     vision_width: int = 1024, text_width: int = 768, embed_dim: int = 768) -> dict[str, tuple]:
    """The reference's key list of a ``kind`` ("text" / "image") file as its constructor would build it
    for another depth or width (the demo's tiny backbone): the literal lists above, with the adapters
    beyond ``*_adapt_until`` dropped (or more added by the same pattern), the 4 projections (4 levels) kept,
    and 1024 / 768 read as the vision width / the text width or embedding, by each module's role in
    ``AdaptedCLIP.__init__``."""
    if kind == "text":
        out = {f"{i}.fc.0.weight": (text_width, text_width) for i in range(text_adapt_until)}
        out[f"{text_adapt_until}.fc.0.weight"] = (embed_dim, text_width)  # the projection comes last
        assert text_adapt_until != 3 or out.keys() == REFERENCE_TEXT_ADAPTER.keys()
        return out
    template = REFERENCE_IMAGE_ADAPTER_RELU if relu else REFERENCE_IMAGE_ADAPTER
    out = {}
    for i in range(image_adapt_until):
        key = f"layer_adapters.{i}.fc.0.weight"
        assert i >= 6 or key in template, key
        out[key] = (vision_width, vision_width)
    for key in template:
        if not key.startswith("layer_adapters."):
            out[key] = (embed_dim, vision_width)
    return out


def reference_tensors(layout: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """Random weights under a reference key list (the values a test then expects back)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in layout.items()}
