"""The distributed setting of a run (or of a recipe about to run under torchrun): how many
processes, which backend, and whether the recipe's global batches still give every rank work."""

from __future__ import annotations

from aaclip_core.doctor.checks import Check
from aaclip_core.recipe import Recipe


def recipe_backend(recipe: Recipe) -> str:
    """The backend `aaclip` would pick for the recipe's device on this machine."""
    import torch

    device = recipe.runtime.device
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def check_distributed(recipe: Recipe | None, world_size: int, backend: str) -> list[Check]:
    """The setting, then per stage the smallest per-rank share of the recipe's global batch.

    A share of 0 means ranks that compute only a weight-0 padding image every step (wasted
    devices); a share of 1 matters where a stage needs batch-mates: official-fidelity stage 1,
    whose DPAM mixes the images of a rank's share (a share of 1 mixes nothing).
    """
    setting = "one process" if world_size == 1 else f"{world_size} processes ({backend}), global batch sizes"
    checks = [Check("distributed setting", "pass", f"{world_size} x {backend}", setting)]
    if world_size == 1 or recipe is None:
        return checks
    for stage, batch in (("stage1", recipe.stage1.batch_size), ("stage2", recipe.stage2.batch_size)):
        share, largest = batch // world_size, -(-batch // world_size)
        name = f"{stage} batch per rank"
        fix = f"--set {stage}.batch_size={2 * world_size}, or fewer processes (torchrun --nproc_per_node)"
        if share == 0:
            checks.append(Check(name, "warn", share, f"{stage}.batch_size = {batch} over {world_size} ranks: "
                                f"{world_size - batch} rank(s) compute only a weight-0 padding image every step", fix))
        elif share == 1 and stage == "stage1" and recipe.fidelity == "official":
            checks.append(Check(name, "warn", share, f"{stage}.batch_size = {batch} over {world_size} ranks: official "
                                "DPAM mixes the images of each rank's share, and a share of 1 image mixes nothing",
                                fix))
        else:
            checks.append(Check(name, "pass", share, f"{stage}.batch_size = {batch} over {world_size} ranks: "
                                f"{share}-{largest} image(s) per rank"))
    return checks
