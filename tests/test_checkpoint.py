"""Training state without pickles: round trips, atomic saves, and clear errors on corrupt files."""

import pytest
import torch

from sid.checkpoint import list_training_states, load_training_state, resolve_resume, save_training_state
from sid.errors import SidError


def state():
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.0, 0.999))
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"nimg": 512, "step": 2, "net": net.state_dict(), "opt": opt.state_dict(), "tag": "x",
            "lst": [1.5, torch.ones(2)]}


def test_round_trip_restores_optimizer_state_exactly(tmp_path):
    s = state()
    path = save_training_state(tmp_path, 512, s)
    back = load_training_state(path)
    assert back["nimg"] == 512 and back["tag"] == "x" and back["lst"][0] == 1.5
    assert set(back["opt"]["state"]) == {0, 1}                           # integer keys survive JSON
    for k in (0, 1):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(back["opt"]["state"][k][name], s["opt"]["state"][k][name])
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    net.load_state_dict(back["net"])
    opt.load_state_dict(back["opt"])
    assert opt.param_groups[0]["betas"] == (0.0, 0.999)
    assert not list(path.glob("*.pkl")) and {p.name for p in path.iterdir()} == {"tensors.safetensors", "state.json"}


def test_keeps_the_newest_and_resolves_latest(tmp_path):
    for nimg in (100, 200, 300):
        save_training_state(tmp_path, nimg, state(), keep=2)
    names = [p.name for p in list_training_states(tmp_path)]
    assert names == ["training-state-000000000200", "training-state-000000000300"]
    assert resolve_resume("auto", tmp_path).name.endswith("300")
    assert resolve_resume("auto", tmp_path / "empty") is None
    with pytest.raises(SidError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = save_training_state(tmp_path, 100, state())
    (path / "tensors.safetensors").write_bytes(b"garbage")
    with pytest.raises(SidError, match="unreadable.*delete it to resume from the previous one"):
        load_training_state(path)
