"""The generator's EMA by half-life in images, with ramp-up (sid/ema.py)."""

import torch

from sid.ema import EMA, ema_beta


def test_ema_beta_matches_sid():
    """β = 0.5^(batch / min(halflife, 0.05 cur_nimg)), as SiD's training loop computes it."""
    assert ema_beta(256, 1_000_000, 500_000, 0.05) == 0.5 ** (256 / 50_000)
    assert ema_beta(256, 100_000_000, 500_000, 0.05) == 0.5 ** (256 / 500_000)
    assert ema_beta(256, 0, 500_000, 0.05) == 0.5 ** (256 / 1e-8)
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, halflife_nimg=1000, rampup=None)
    with torch.no_grad():
        old = ema.model.weight.clone()
        net.weight.add_(1.0)
    ema.update(net, cur_nimg=10_000, batch=1000)
    torch.testing.assert_close(ema.model.weight, 0.5 * old + 0.5 * net.weight)
