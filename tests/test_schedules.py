"""σ distributions and grids (sid/schedules.py): SiD's Karras σ below t_max, and the sampling grid."""

import torch

from sid.schedules import karras_sigma, karras_sigmas, sample_sid_sigma


def test_sid_sigma_values_and_range():
    u = torch.tensor([0.0, 0.4, 0.8, 1.0], dtype=torch.float64)
    torch.testing.assert_close(karras_sigma(u, 0.002, 80.0, 7.0),
                               torch.tensor([0.002, 0.965417, 24.408342, 80.0], dtype=torch.float64), rtol=1e-6, atol=0)
    torch.manual_seed(0)
    s = sample_sid_sigma(100_000, 0.8, 0.002, 80.0, 7.0)
    assert s.min() >= 0.002 and s.max() < 24.408342
    assert abs(float((s < 1).float().mean()) - 0.505) < 0.01                 # SiD's t_max = 0.8: P(σ < 1) ≈ 0.505


def test_karras_grid():
    sigmas = karras_sigmas(18, 0.002, 80.0)
    assert len(sigmas) == 19 and sigmas[0] == 80.0 and abs(sigmas[-2] - 0.002) < 1e-12 and sigmas[-1] == 0
    assert (sigmas.diff() < 0).all()
