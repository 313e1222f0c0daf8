"""Prompt ensembles and text anchors (SPEC §2).

Per class: 3 normal and 5 abnormal states, each in 2 templates -> 6 + 10 = 16 sentences. The
anchors T [E, 2] are the normalised means of the normalised sentence embeddings of each state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORMAL_STATES = ("{}", "a {}", "the {}")
ABNORMAL_STATES = ("a damaged {}", "a broken {}", "a {} with flaw", "a {} with defect", "a {} with damage")
TEMPLATES = ("{}.", "a photo of {}.")
N_NORMAL = len(NORMAL_STATES) * len(TEMPLATES)
N_PROMPTS = N_NORMAL + len(ABNORMAL_STATES) * len(TEMPLATES)


def class_prompts(descriptive_name: str) -> list[str]:
    """The 16 sentences of one class, normal ones first."""
    return [t.format(s.format(descriptive_name)) for s in NORMAL_STATES + ABNORMAL_STATES for t in TEMPLATES]


def split_prompts(descriptive_name: str) -> tuple[list[str], list[str]]:
    """The class's normal sentences and its abnormal ones."""
    sentences = class_prompts(descriptive_name)
    return sentences[:N_NORMAL], sentences[N_NORMAL:]


def anchors_from_embeddings(emb: torch.Tensor) -> torch.Tensor:
    """[..., 16, E] sentence embeddings -> [..., E, 2] anchors (column 0 normal, 1 abnormal)."""
    emb = F.normalize(emb, dim=-1)
    normal = F.normalize(emb[..., :N_NORMAL, :].mean(dim=-2), dim=-1)
    abnormal = F.normalize(emb[..., N_NORMAL:, :].mean(dim=-2), dim=-1)
    return torch.stack([normal, abnormal], dim=-1)
