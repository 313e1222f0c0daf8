"""aaclip's own checkpoint format: round trips, optimiser state, atomic saves (SPEC §4, §11)."""

from __future__ import annotations

import json

import pytest
import torch

from aaclip_core.checkpoints import checkpoint as checkpoints
from aaclip_core.checkpoints.checkpoint import ADAPTERS, MANIFEST, OPTIMIZER, load_checkpoint, save_checkpoint
from aaclip_core.errors import CheckpointError, LocalFileError
from aaclip_core.record import MANIFEST_VERSION


def _adapters(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "text_adapter.0.fc.0.weight": torch.randn(8, 8, generator=g),
        "image_adapter.seg_proj.0.fc.weight": torch.randn(4, 8, generator=g),
        "image_adapter.det_proj.fc.weight": torch.randn(4, 8, generator=g).t(),  # non-contiguous
    }


MANIFEST_IN = {
    "stage": "stage2",
    "epoch": 6,
    "loop": None,
    "fidelity": "official",
    "backbone": "aaclip-tiny:none@112",
    "recipe": {"stage2": {"lr": 0.001, "milestones": [16000, 32000]}},
}


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_round_trip_tensors_and_manifest(tmp_path):
    target = tmp_path / "ckpts" / "final"
    adapters = _adapters()
    out = save_checkpoint(target, adapters, MANIFEST_IN)
    assert out == target
    assert sorted(p.name for p in target.iterdir()) == [ADAPTERS, MANIFEST]
    ck = load_checkpoint(target)
    assert set(ck.adapters) == set(adapters)
    for k, v in adapters.items():
        assert torch.equal(ck.adapters[k], v), k
        assert ck.adapters[k].dtype == v.dtype
    assert ck.manifest == {"format_version": MANIFEST_VERSION, **MANIFEST_IN}
    assert ck.optimizer is None
    # Only the final directory is left: no temporary or backup directories.
    assert _siblings(target) == ["final"]


def test_round_trip_of_model_adapters(make_model, tmp_path):
    model = make_model()
    save_checkpoint(tmp_path / "m", model.adapter_state_dict(), {"epoch": 1})
    other = make_model(seed=1)  # different adapter (and backbone) init
    own = other.adapter_state_dict()
    assert not all(torch.equal(own[k], v) for k, v in model.adapter_state_dict().items())
    other.load_adapter_state_dict(load_checkpoint(tmp_path / "m").adapters)
    for k, v in model.adapter_state_dict().items():
        assert torch.equal(other.adapter_state_dict()[k], v), k


def _train_two_steps():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.Adam(params, lr=0.01, betas=(0.5, 0.999))
    for step in range(2):
        opt.zero_grad()
        loss = (params[0] ** 2).sum() + (params[1] * (step + 1)).sum()
        loss.backward()
        opt.step()
    return params, opt


def _one_step(params, opt):
    opt.zero_grad()
    loss = (params[0] ** 3).sum() + (params[1] ** 2).sum()
    loss.backward()
    opt.step()


def test_optimizer_state_round_trip(tmp_path):
    params, opt = _train_two_steps()
    adapters = {"p0": params[0].detach().clone(), "p1": params[1].detach().clone()}
    save_checkpoint(tmp_path / "c", adapters, {"epoch": 2}, optimizer_state=opt.state_dict())
    assert (tmp_path / "c" / OPTIMIZER).is_file()

    ck = load_checkpoint(tmp_path / "c", with_optimizer=True)
    assert ck.optimizer is not None
    assert set(ck.optimizer["state"]) == {0, 1}
    fresh = [torch.nn.Parameter(ck.adapters["p0"].clone()), torch.nn.Parameter(ck.adapters["p1"].clone())]
    fresh_opt = torch.optim.Adam(fresh, lr=0.5, betas=(0.9, 0.9))  # hyper-parameters come from the file
    fresh_opt.load_state_dict(ck.optimizer)
    assert fresh_opt.param_groups[0]["lr"] == 0.01
    assert tuple(fresh_opt.param_groups[0]["betas"]) == (0.5, 0.999)
    for pid in (0, 1):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh_opt.state[fresh[pid]][key], opt.state[params[pid]][key])
        assert float(fresh_opt.state[fresh[pid]]["step"]) == 2.0

    _one_step(params, opt)
    _one_step(fresh, fresh_opt)
    for a, b in zip(params, fresh):
        assert torch.equal(a.detach(), b.detach())
    # Without with_optimizer the state is not loaded.
    assert load_checkpoint(tmp_path / "c").optimizer is None


def test_optimizer_state_actually_matters(tmp_path):
    """Control for the round-trip test: a fresh Adam (no loaded state) takes a different step."""
    params, opt = _train_two_steps()
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh_opt = torch.optim.Adam(fresh, lr=0.01, betas=(0.5, 0.999))
    _one_step(params, opt)
    _one_step(fresh, fresh_opt)
    assert not torch.equal(params[0].detach(), fresh[0].detach())


def _failing_save_file(real):
    calls = {"n": 0}

    def save_then_fail(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)  # the file is written...
        calls["n"] += 1
        raise OSError("disk full (simulated)")  # ...then the save blows up

    return save_then_fail, calls


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "final"
    old = _adapters(0)
    save_checkpoint(target, old, {"epoch": 1})
    fail, calls = _failing_save_file(checkpoints.save_file)
    monkeypatch.setattr(checkpoints, "save_file", fail)
    # One paragraph naming the checkpoint and the cause (the CLI's exit 2), not the bare OSError.
    with pytest.raises(LocalFileError, match=r"Cannot write the checkpoint .*final: disk full \(simulated\)"):
        save_checkpoint(target, _adapters(1), {"epoch": 2})
    assert calls["n"] == 1
    monkeypatch.undo()
    ck = load_checkpoint(target)
    assert ck.manifest["epoch"] == 1
    for k, v in old.items():
        assert torch.equal(ck.adapters[k], v)
    assert _siblings(target) == ["final"]  # no temp dir left behind


def test_failed_save_of_optimizer_leaves_nothing(tmp_path, monkeypatch):
    """A failure at the second file (optimizer) of a first save: no directory appears at all."""
    target = tmp_path / "stage1"
    real = checkpoints.save_file
    n = {"calls": 0}

    def fail_second(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        n["calls"] += 1
        if n["calls"] == 2:
            raise RuntimeError("interrupted (simulated)")

    monkeypatch.setattr(checkpoints, "save_file", fail_second)
    _, opt = _train_two_steps()
    with pytest.raises(RuntimeError, match="simulated"):
        save_checkpoint(target, _adapters(), {"epoch": 1}, optimizer_state=opt.state_dict())
    assert n["calls"] == 2
    assert list(tmp_path.iterdir()) == []


def test_successful_overwrite_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "final"
    save_checkpoint(target, _adapters(0), {"epoch": 1})
    save_checkpoint(target, _adapters(1), {"epoch": 2})
    ck = load_checkpoint(target)
    assert ck.manifest["epoch"] == 2
    assert torch.equal(ck.adapters["text_adapter.0.fc.0.weight"], _adapters(1)["text_adapter.0.fc.0.weight"])
    assert _siblings(target) == ["final"]


def test_loading_a_non_checkpoint_dir(tmp_path):
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(empty)
    assert str(empty) in str(info.value)
    # A manifest alone is not enough either.
    (empty / MANIFEST).write_text(json.dumps({"epoch": 1}), encoding="utf-8")
    with pytest.raises(CheckpointError, match="not-a-checkpoint"):
        load_checkpoint(empty)
    with pytest.raises(CheckpointError, match="missing-dir"):
        load_checkpoint(tmp_path / "missing-dir")


def test_loading_a_checkpoint_with_corrupt_manifest(tmp_path):
    target = tmp_path / "broken"
    save_checkpoint(target, _adapters(), {"epoch": 1})
    (target / MANIFEST).write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="broken.*cannot be read"):
        load_checkpoint(target)


def test_loading_a_checkpoint_with_corrupt_tensors(tmp_path):
    target = tmp_path / "broken"
    save_checkpoint(target, _adapters(), {"epoch": 1})
    (target / ADAPTERS).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(target)
