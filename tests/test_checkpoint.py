"""Checkpoint files: atomic, checksummed, damaged or half-written ones never picked."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from memfit.errors import UserError
from memfit.train import checkpoint as ckpt


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(4, 4)
        self.trained = torch.nn.Linear(4, 2)
        self.frozen.requires_grad_(False)


def _parts(seed=0):
    torch.manual_seed(seed)
    model = TwoLayer()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model.trained(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def _save(run_dir, step, model, optimizer, scheduler, keep=3):
    return ckpt.save_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                trainer_state={"step": step, "samples_seen": step * 2}, meta={"config": {}}, keep=keep)


def test_save_and_restore_roundtrip_with_rng(tmp_path):
    model, optimizer, scheduler = _parts()
    random.seed(7)
    torch.manual_seed(7)
    path = _save(tmp_path, 5, model, optimizer, scheduler)
    expected_draws = (random.random(), torch.rand(3))
    assert path == tmp_path / "checkpoints" / "step-5"
    meta = json.loads((path / "meta.json").read_text())
    assert set(meta["files"]) == {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.json",
                                  "trainer_state.json"}
    assert set(load_file(path / "trainable.safetensors")) == {"trained.weight", "trained.bias"}

    fresh, fresh_optimizer, fresh_scheduler = _parts(seed=1)
    state = ckpt.restore(ckpt.open_checkpoint(path), model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert state == {"step": 5, "samples_seen": 10}
    assert torch.equal(fresh.trained.weight, model.trained.weight)
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert fresh_scheduler.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"]
    assert random.random() == expected_draws[0] and torch.equal(torch.rand(3), expected_draws[1])


def test_corrupted_checkpoint_is_refused_and_latest_skips_it(tmp_path):
    model, optimizer, scheduler = _parts()
    _save(tmp_path, 2, model, optimizer, scheduler)
    newest = _save(tmp_path, 4, model, optimizer, scheduler)
    data = bytearray((newest / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "optimizer.pt").write_bytes(bytes(data))
    assert "checksum" in ckpt.verify_checkpoint(newest)
    skipped = []
    assert ckpt.latest_checkpoint(tmp_path, skipped).step == 2
    assert "step-4" in skipped[0] and "optimizer.pt" in skipped[0]
    with pytest.raises(UserError, match="cannot be resumed: optimizer.pt does not match"):
        ckpt.open_checkpoint(newest)
    assert ckpt.open_checkpoint(tmp_path).step == 2  # a run dir: the newest good one


def test_half_written_checkpoints_are_never_listed_and_get_cleaned(tmp_path):
    model, optimizer, scheduler = _parts()
    _save(tmp_path, 1, model, optimizer, scheduler)
    partial = tmp_path / "checkpoints" / ".tmp-step-2-999"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"half")
    no_meta = tmp_path / "checkpoints" / "step-3"
    no_meta.mkdir()
    assert ckpt.latest_checkpoint(tmp_path).step == 1
    assert ckpt.remove_partial_checkpoints(tmp_path) == [partial]
    assert not partial.exists()


def test_keeps_only_the_newest(tmp_path):
    model, optimizer, scheduler = _parts()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, optimizer, scheduler, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-3", "step-4"]


def test_checkpoint_of_another_model_is_refused(tmp_path):
    model, optimizer, scheduler = _parts()
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    other = torch.nn.Linear(4, 2)
    other_optimizer = torch.optim.AdamW(other.parameters())
    with pytest.raises(UserError, match="does not match this model"):
        ckpt.restore(ckpt.open_checkpoint(path), model=other, optimizer=other_optimizer,
                     scheduler=torch.optim.lr_scheduler.LambdaLR(other_optimizer, lambda s: 1.0))


def test_a_checkpoint_of_the_same_step_is_replaced_whole(tmp_path):
    # After a resume from an earlier step (or over a damaged directory), the step's new state wins.
    first, second = _parts(seed=0), _parts(seed=1)
    _save(tmp_path, 4, *first)
    path = _save(tmp_path, 4, *second)
    assert torch.equal(load_file(path / "trainable.safetensors")["trained.weight"], second[0].trained.weight)
    assert ckpt.verify_checkpoint(path) is None
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-4"]  # nothing moved aside is left
