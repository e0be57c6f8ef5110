"""longctx.evals.scaling.fit on curves with known ground truth (closed forms + noise)."""

import math

import numpy as np
import pytest

from longctx.evals import scaling as S

X = np.repeat(np.logspace(2, 4.5, 8), 3)  # 8 knob values x 3 seeds
U = np.log10(X)


def _noise(sd, seed=0):
    return np.random.default_rng(seed).normal(0, sd, X.size)


def test_a_noisy_sigmoid_in_log_x_is_a_phase_change_at_x0():
    x0 = 10**3.3
    y = 0.1 + 0.8 / (1 + np.exp(-8 * (U - 3.3))) + _noise(0.03)
    f = S.fit(X, y, n_boot=50)
    assert f.best == "sigmoid" and f.phase_change is not None
    lo, mid, hi = f.phase_change
    assert lo <= x0 <= hi and hi / lo < 10**0.3  # narrow: within a factor 2
    assert f.ci["lo"][0] <= 0.1 <= f.ci["lo"][1] and f.ci["hi"][0] <= 0.9 <= f.ci["hi"][1]
    np.testing.assert_allclose(f.predict(X), S.curve("sigmoid", f.params, X))
    # a step (infinitely sharp) between two knob values: x0 between them
    xs = np.unique(X)
    step = np.where(X > xs[4], 0.9, 0.05) + _noise(0.02, seed=1)
    g = S.fit(X, step, n_boot=50)
    assert g.phase_change is not None and xs[3] <= g.phase_change[1] <= xs[5]
    assert g.phase_change[0] <= xs[4] and g.phase_change[2] >= xs[5]  # at least the gap


def test_log_linear_and_power_law_are_never_a_phase_change_and_recover_their_parameters():
    y = 0.1 + 0.2 * U + _noise(0.03)
    f = S.fit(X, y, n_boot=50)
    assert f.best == "log_linear" and f.phase_change is None
    assert f.ci["a"][0] <= 0.1 <= f.ci["a"][1] and f.ci["b"][0] <= 0.2 <= f.ci["b"][1]
    y = 2 + 5 * X**-0.5 + _noise(0.01, seed=2)
    # In log x a power law is an exponential, i.e. a sigmoid's tail: either may win, but
    # never as a phase change (the tail's transition is far wider than the data).
    assert S.fit(X, y, n_boot=20).phase_change is None
    p = S.fit(X, y, n_boot=50, curves=["constant", "log_linear", "power_law"])
    assert p.best == "power_law" and p.phase_change is None
    assert p.ci["b"][0] <= -0.5 <= p.ci["b"][1] and p.ci["b"][1] - p.ci["b"][0] < 0.3
    assert p.ci["c"][0] <= 2 <= p.ci["c"][1]
    # a smooth sigmoid (transition wider than the data) is no phase change either
    s = S.fit(X, 0.1 + 0.8 / (1 + np.exp(-1.0 * (U - 3.3))) + _noise(0.03, seed=3), n_boot=20)
    assert s.phase_change is None


def test_pure_noise_claims_nothing():
    for seed in range(3):
        f = S.fit(X, 0.5 + _noise(0.05, seed=10 + seed), n_boot=20)
        assert f.phase_change is None and f.best == "constant", f.scores
        assert abs(f.params["c"] - 0.5) < 0.05 and f.ci["c"][0] < f.params["c"] < f.ci["c"][1]


def test_curves_closed_forms_and_bad_input():
    p = {"c": 1.0, "a": 2.0, "b1": 1.0, "b2": -1.0, "xb": 100.0}
    np.testing.assert_allclose(S.curve("broken_power_law", p, [10.0, 100.0, 1000.0]),
                               [1.2, 3.0, 1.2])
    np.testing.assert_allclose(
        S.curve("sigmoid", {"lo": 0, "hi": 1, "k": 2.0, "x0": 100.0}, [100.0, 1000.0]),
        [0.5, 1 / (1 + math.exp(-2.0))])
    with pytest.raises(ValueError, match="x must be > 0"):
        S.fit([0, 1, 2, 3], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="3 distinct"):
        S.fit([1, 1, 2, 2], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="differ in length"):
        S.fit([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="unknown curves"):
        S.fit([1, 2, 3], [1, 2, 3], curves=["cubic"])
