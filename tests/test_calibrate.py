"""bank/calibrate.py: temperature and top-k chosen on the bank itself."""

import numpy as np


def test_calibration_finds_the_exact_neighbour():
    from lorablend.bank.calibrate import calibrate

    rng = np.random.default_rng(0)
    theta = np.repeat(rng.normal(size=(4, 50)), 2, axis=0)  # entries come in identical pairs
    D = rng.uniform(1, 2, size=(8, 8))
    for t in range(8):
        D[t, t ^ 1] = 0.0  # each entry's twin is its nearest
    cal = calibrate(D, theta @ theta.T, list(range(8)))
    assert cal.top_k == 1 and cal.loss < 1e-9
