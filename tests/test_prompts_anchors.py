"""Prompt ensembles and per-class text anchors (SPEC §2, §11)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aaclip_core.prompts.anchors import AnchorBank
from aaclip_core.prompts.names import PromptNamer
from aaclip_core.prompts.templates import N_NORMAL, N_PROMPTS, anchors_from_embeddings, class_prompts

BOTTLE = [
    "bottle.",
    "a photo of bottle.",
    "a bottle.",
    "a photo of a bottle.",
    "the bottle.",
    "a photo of the bottle.",
    "a damaged bottle.",
    "a photo of a damaged bottle.",
    "a broken bottle.",
    "a photo of a broken bottle.",
    "a bottle with flaw.",
    "a photo of a bottle with flaw.",
    "a bottle with defect.",
    "a photo of a bottle with defect.",
    "a bottle with damage.",
    "a photo of a bottle with damage.",
]


def test_sixteen_sentences_normal_first_exact():
    assert N_PROMPTS == 16 and N_NORMAL == 6
    assert class_prompts("bottle") == BOTTLE


def test_prompts_use_descriptive_name():
    name = PromptNamer("VisA").resolve("pcb3").name
    assert name == "infrared sensor pcb module"
    prompts = class_prompts(name)
    assert "a damaged infrared sensor pcb module." in prompts
    assert prompts[5] == "a photo of the infrared sensor pcb module."
    assert len(set(prompts)) == 16


def test_anchors_from_embeddings_by_hand():
    emb = torch.zeros(16, 3)
    emb[:6, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # all point along e0, different norms
    emb[6:, 1] = 10.0  # abnormal along e1
    emb[15] = torch.tensor([0.0, 0.0, 0.5])  # one abnormal sentence along e2, small norm
    t = anchors_from_embeddings(emb)
    assert t.shape == (3, 2)
    assert torch.allclose(t[:, 0], torch.tensor([1.0, 0.0, 0.0]))
    # Sentences are normalised before averaging: 9 along e1 and 1 along e2 (norm ignored) -> (0, 9, 1)/sqrt(82).
    assert torch.allclose(t[:, 1], torch.tensor([0.0, 9.0, 1.0]) / 82**0.5, atol=1e-6)


def test_anchors_from_embeddings_batched_and_unit_norm():
    emb = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(0))
    t = anchors_from_embeddings(emb)
    assert t.shape == (4, 8, 2)
    assert torch.allclose(t.norm(dim=-2), torch.ones(4, 2), atol=1e-6)
    manual = F.normalize(F.normalize(emb[2, :6], dim=-1).mean(0), dim=0)
    assert torch.allclose(t[2, :, 0], manual, atol=1e-6)


@pytest.fixture
def model(make_model):
    return make_model()


def _manual_anchors(model, descriptive: str) -> torch.Tensor:
    with torch.no_grad():
        emb = model.encode_text(model.tokenize(class_prompts(descriptive)))  # [16, E], no cached prefix
    emb = F.normalize(emb, dim=-1)
    normal = F.normalize(emb[:6].mean(0), dim=-1)
    abnormal = F.normalize(emb[6:].mean(0), dim=-1)
    return torch.stack([normal, abnormal], dim=-1)


def test_anchor_bank_matches_manual_computation(model):
    names = PromptNamer("synthetic", overrides={"plank": "wooden plank", "disc": "metal disc"})
    bank = AnchorBank(model, ["plank", "fabric", "plank", "disc"], names)
    assert bank.class_names == ["disc", "fabric", "plank"]
    assert bank.descriptive == {"disc": "metal disc", "fabric": "fabric", "plank": "wooden plank"}
    with torch.no_grad():
        t = bank.anchors(["plank", "disc", "plank"])
    e = model.dims.embed_dim
    assert t.shape == (3, e, 2)
    assert torch.allclose(t.norm(dim=1), torch.ones(3, 2), atol=1e-5)
    assert torch.equal(t[0], t[2])
    assert not torch.allclose(t[0], t[1])
    assert torch.allclose(t[0], _manual_anchors(model, "wooden plank"), atol=1e-5)
    assert torch.allclose(t[1], _manual_anchors(model, "metal disc"), atol=1e-5)


def test_anchor_bank_freeze_caches_identical_values(model):
    bank = AnchorBank(model, ["plank", "disc"], "synthetic")
    with torch.no_grad():
        live = bank.anchors(["disc", "plank"])
    bank.freeze()
    frozen = bank.anchors(["disc", "plank"])
    assert torch.allclose(live, frozen, atol=1e-6)
    # Cached: a change to the text adapters is not seen until unfreeze().
    with torch.no_grad():
        model.text_adapter[-1].fc[0].weight.mul_(-1.0)
    assert torch.equal(bank.anchors(["disc", "plank"]), frozen)
    bank.unfreeze()
    with torch.no_grad():
        assert not torch.allclose(bank.anchors(["disc", "plank"]), frozen, atol=1e-3)


def test_anchor_bank_carries_gradient_to_text_adapters(model):
    bank = AnchorBank(model, ["plank"], "synthetic")
    for p in model.text_adapter.parameters():
        p.requires_grad_(True)
    t = bank.anchors(["plank"])
    (t[..., 0] * t[..., 1]).sum().backward()
    assert all(p.grad is not None and float(p.grad.norm()) > 0 for p in model.text_adapter.parameters())
    assert all(p.grad is None for p in model.clip.parameters())


def test_anchor_bank_unknown_class(model):
    bank = AnchorBank(model, ["plank"], "synthetic")
    with pytest.raises(KeyError, match="wombat"):
        bank.anchors(["wombat"])


def test_cached_prefix_equals_full_text_encoding(model):
    tokens = model.tokenize(class_prompts("metal disc"))
    with torch.no_grad():
        full = model.encode_text(tokens)
        cached = model.encode_text(tokens, model.text_prefix(tokens))
    assert torch.allclose(full, cached, atol=1e-6)
