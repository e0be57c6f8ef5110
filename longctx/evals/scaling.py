"""Scaling-curve fits that tell log-linear growth from a power law and from a phase change.

    fit = longctx.evals.scaling.fit(x, y)      # x > 0 (repeated x = seeds), y a metric
    fit.best, fit.params, fit.ci, fit.phase_change, fit.predict(x_new)

Candidate curves (``u = log10 x``):

* ``constant``          ``y = c``  (the null: nothing changes with the knob)
* ``log_linear``        ``y = a + b u``
* ``power_law``         ``y = c + a x^b``
* ``sigmoid``           ``y = lo + (hi - lo) / (1 + exp(-k (u - log10 x0)))``, a phase
  change at ``x0`` (``k`` per decade)
* ``broken_power_law``  ``y = c + a (x / xb)^b1`` for ``x < xb``, ``c + a (x / xb)^b2``
  above (continuous at the break ``xb``)

Each curve is linear in its amplitude parameters given its shape parameters, so a
fit is a grid over the shape parameters (every amplitude solved in closed form,
vectorised over the grid), then Nelder-Mead from the best few grid points
(restarts) on a robust objective: the Huber loss (scale 1.345 x the MAD of the
grid fit's residuals), amplitudes re-solved by iteratively reweighted least
squares at every step. As in OLMo-core's scaling-law fits: robust loss, restarts
from a grid, a minimum number of points, bootstrapped intervals.

Choice: leave-one-x-out cross-validation (every distinct ``x`` held out in turn,
with all its seeds); ``score = log(median squared held-out error) + 2 k / n`` (``k``
parameters, ``n`` points); the curve with the fewest parameters whose score is within
``SIMPLER_MARGIN`` (held-out error within 25 %) of the lowest wins. The median, not
the mean: when the held-out knob value is the one inside a sharp transition, no
curve can know where in the gap the jump is, and those one or two folds would
otherwise decide the choice. A curve needs ``k + 1`` distinct ``x``
to take part. ``ci``: percentile intervals (2.5 %, 97.5 %) of the best curve's
parameters refitted on ``n_boot`` bootstrap resamples of the points.

``phase_change = (x0_lo, x0, x0_hi)`` only when all of: the sigmoid is the best
curve and beats every smooth one (constant, log-linear, power law) by
``PHASE_MARGIN`` in score (its held-out mean squared error at least 2x lower); its
10-90 % transition, ``2 ln 9 / k`` decades, spans at most
``PHASE_WIDTH`` of the data's range of ``log10 x``; ``x0`` lies inside the data;
the jump ``|hi - lo|`` exceeds 4 residual standard deviations. Otherwise None. The
interval is the bootstrap one, widened to the gap between the knob values on either
side of ``x0`` when the transition is narrower than that gap.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = ["Fit", "fit", "CURVES", "curve"]

PHASE_MARGIN = math.log(2.0)
PHASE_WIDTH = 1.0 / 3.0
SMOOTH = ("constant", "log_linear", "power_law")
CV_REDUCE = np.median  # of the squared held-out errors: see the module docstring
SIMPLER_MARGIN = math.log(1.25)
_HUBER = 1.345

# name -> number of fitted parameters (k in the selection penalty)
CURVES = {
    "constant": 1,
    "log_linear": 2,
    "power_law": 3,
    "sigmoid": 4,
    "broken_power_law": 5,
}


# ----------------------------------------------------------------------------
# The curves: basis [.., n, 2] given shape parameters; y = B @ (amplitudes)
# ----------------------------------------------------------------------------


def _sig(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # 1 / (1 + e^-z) without overflow


def _basis(name, theta, u, u_ref):
    """theta [G, p] shape parameters -> basis [G, n, 2] (column 0 the constant)."""
    G = theta.shape[0]
    one = np.ones((G, u.size))
    if name == "power_law":  # theta: b; the power is taken of x / x_ref (conditioning)
        g = 10.0 ** (theta[:, :1] * (u[None] - u_ref))
    elif name == "sigmoid":  # theta: log10 k, u0
        g = _sig(10.0 ** theta[:, :1] * (u[None] - theta[:, 1:2]))
    elif name == "broken_power_law":  # theta: ub, b1, b2
        d = u[None] - theta[:, :1]
        g = 10.0 ** (np.where(d < 0, theta[:, 1:2], theta[:, 2:3]) * d)
    else:
        raise KeyError(name)
    return np.stack([one, g], -1)


def _solve(B, y, w=None):
    """Weighted least squares per grid point: B [G, n, 2], y [n] -> beta [G, 2], resid [G, n]."""
    w = np.ones_like(y) if w is None else w
    w = np.broadcast_to(w, B.shape[:2])
    Bw = B * w[..., None]
    A = np.einsum("gni,gnj->gij", Bw, B) + 1e-12 * np.eye(2)
    rhs = np.einsum("gni,gn->gi", Bw, np.broadcast_to(y, B.shape[:2]))
    beta = np.linalg.solve(A, rhs[..., None])[..., 0]
    return beta, y[None] - np.einsum("gni,gi->gn", B, beta)


def _huber(r, delta):
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta)).sum(-1)


def _solve1(g, y, w):
    """``y ~ b0 + b1 g`` by weighted least squares, closed form (one shape, the hot path)."""
    s0, s1, s2 = w.sum(), (w * g).sum(), (w * g * g).sum()
    t0, t1 = (w * y).sum(), (w * g * y).sum()
    det = s0 * s2 - s1 * s1
    if abs(det) <= 1e-12 * max(s0 * s2, 1e-300):  # g constant: the mean only
        return np.array([t0 / s0, 0.0])
    return np.array([(s2 * t0 - s1 * t1) / det, (s0 * t1 - s1 * t0) / det])


def _robust(name, theta, u, y, u_ref, delta, iters=3):
    """Huber loss of the IRLS amplitudes at shape ``theta`` [p]; (loss, beta [2])."""
    g = _basis(name, theta[None], u, u_ref)[0, :, 1]
    w = np.ones_like(y)
    for _ in range(iters + 1):
        beta = _solve1(g, y, w)
        r = y - beta[0] - beta[1] * g
        w = np.minimum(1.0, delta / np.maximum(np.abs(r), 1e-300))
    return float(_huber(r, delta)), beta


def _nelder_mead(f, x0, step, iters=80, tol=1e-9):
    """Minimise ``f`` from ``x0`` (simplex of ``step`` sizes). Returns (x, f(x))."""
    n = x0.size
    pts = [x0] + [x0 + np.eye(n)[i] * step[i] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) <= tol * (abs(vals[0]) + tol):
            break
        c = np.mean(pts[:-1], 0)
        xr = c + (c - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = c + 2 * (c - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = c + 0.5 * (pts[-1] - c)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    i = int(np.argmin(vals))
    return pts[i], vals[i]


def _grid(name, u):
    lo, hi = float(u.min()), float(u.max())
    R = max(hi - lo, 1e-9)
    if name == "power_law":
        b = np.linspace(-3, 3, 61)
        return b[np.abs(b) > 1e-9][:, None], (-6.0, 6.0)
    if name == "sigmoid":  # k from a 20-decade-wide to a 0.02-range-wide transition
        lk = np.linspace(math.log10(0.4 / R), math.log10(200.0 / R), 24)
        u0 = np.linspace(lo - 0.1 * R, hi + 0.1 * R, 32)
        g = np.stack(np.meshgrid(lk, u0, indexing="ij"), -1).reshape(-1, 2)
        return g, None
    if name == "broken_power_law":
        xs = np.unique(u)
        ub = (xs[1:-2] + xs[2:-1]) / 2 if xs.size >= 4 else np.array([(lo + hi) / 2])
        b = np.linspace(-2, 2, 17)
        g = np.stack(np.meshgrid(ub, b, b, indexing="ij"), -1).reshape(-1, 3)
        return g, None
    raise KeyError(name)


def _in_bounds(name, theta, u):
    lo, hi = float(u.min()), float(u.max())
    R = max(hi - lo, 1e-9)
    if name == "power_law":
        return abs(theta[0]) <= 6.0
    if name == "sigmoid":
        return (math.log10(0.4 / R) - 1e-9 <= theta[0] <= math.log10(1000.0 / R)
                and lo - 0.5 * R <= theta[1] <= hi + 0.5 * R)
    if name == "broken_power_law":
        return lo < theta[0] < hi and abs(theta[1]) <= 6 and abs(theta[2]) <= 6
    return True


def _fit_one(name, x, y, *, restarts=3):
    """Fit curve ``name``; returns its reported parameters (dict)."""
    u = np.log10(x)
    u_ref = float(u.mean())
    if name in ("constant", "log_linear"):
        B = np.ones((1, u.size, 2))
        B[0, :, 1] = u if name == "log_linear" else 0.0
        beta, r = _solve(B, y)
        delta = _scale(r[0])
        for _ in range(6):
            w = np.minimum(1.0, delta / np.maximum(np.abs(r[0]), 1e-300))
            beta, r = _solve(B, y, w)
        b = beta[0]
        return {"c": float(b[0])} if name == "constant" else {"a": float(b[0]), "b": float(b[1])}
    grid, _ = _grid(name, u)
    beta, r = _solve(_basis(name, grid, u, u_ref), y)
    sse = (r * r).sum(-1)
    best = np.argsort(sse)[:restarts]
    delta = _scale(r[best[0]])
    step = np.ptp(grid, 0) / 8 + 1e-3
    out = None
    for i in best:
        th, val = _nelder_mead(
            lambda t: _robust(name, t, u, y, u_ref, delta)[0] if _in_bounds(name, t, u)
            else np.inf, grid[i].astype(float), step)
        if out is None or val < out[1]:
            out = (th, val)
    th = out[0]
    b = _robust(name, th, u, y, u_ref, delta)[1]
    if name == "power_law":  # a (x / x_ref)^b = a x_ref^-b x^b
        return {"c": float(b[0]), "a": float(b[1] * 10.0 ** (-th[0] * u_ref)), "b": float(th[0])}
    if name == "sigmoid":
        return {"lo": float(b[0]), "hi": float(b[0] + b[1]), "k": float(10.0 ** th[0]),
                "x0": float(10.0 ** th[1])}
    return {"c": float(b[0]), "a": float(b[1]), "b1": float(th[1]), "b2": float(th[2]),
            "xb": float(10.0 ** th[0])}


def _scale(r):
    mad = 1.4826 * float(np.median(np.abs(r - np.median(r))))
    return _HUBER * max(mad, 1e-6 * (float(np.abs(r).max()) + 1e-12), 1e-12)


def curve(name: str, params: dict, x) -> np.ndarray:
    """Evaluate curve ``name`` with reported ``params`` at ``x`` (float64, shape of x)."""
    x = np.asarray(x, np.float64)
    u = np.log10(x)
    p = params
    if name == "constant":
        return np.full_like(x, p["c"])
    if name == "log_linear":
        return p["a"] + p["b"] * u
    if name == "power_law":
        return p["c"] + p["a"] * x ** p["b"]
    if name == "sigmoid":
        return p["lo"] + (p["hi"] - p["lo"]) * _sig(p["k"] * (u - math.log10(p["x0"])))
    if name == "broken_power_law":
        r = x / p["xb"]
        return p["c"] + p["a"] * r ** np.where(r < 1, p["b1"], p["b2"])
    raise ValueError(f"unknown curve {name!r}; expected one of {list(CURVES)}")


# ----------------------------------------------------------------------------
# Selection, bootstrap, the Fit
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fit:
    """The chosen curve, its parameters with bootstrap intervals, and every candidate's fit.

    ``scores``/``cv_rmse``: per candidate (lower is better; absent: too few distinct x).
    ``boot``: the best curve's parameters on each bootstrap resample (for bands).
    """

    best: str
    params: dict
    ci: dict
    phase_change: tuple | None
    scores: dict
    cv_rmse: dict
    fits: dict
    boot: list
    n: int

    def predict(self, x, curve_name: str | None = None) -> np.ndarray:
        name = curve_name or self.best
        return curve(name, self.fits[name], x)

    def band(self, x, q=(2.5, 97.5)):
        """Pointwise percentile band of the best curve over the bootstrap fits: (lo, hi)."""
        ys = np.stack([curve(self.best, p, x) for p in self.boot]) if self.boot else \
            np.stack([self.predict(x)])
        return np.percentile(ys, q[0], 0), np.percentile(ys, q[1], 0)

    def to_dict(self) -> dict:
        return {"best": self.best, "params": self.params,
                "ci": {k: list(v) for k, v in self.ci.items()},
                "phase_change": None if self.phase_change is None else list(self.phase_change),
                "scores": self.scores, "cv_rmse": self.cv_rmse, "fits": self.fits, "n": self.n}


def fit(x, y, *, n_boot: int = 200, seed: int = 0, curves=None) -> Fit:
    """Fit every candidate curve to ``(x, y)``, choose one, bootstrap its intervals.

    ``x``: float [n] > 0 (repeated values are seeds); ``y``: float [n]. Needs at least 3
    distinct ``x`` and finite values. ``curves``: candidate names (default all).
    """
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"fit: x and y differ in length: {x.size} vs {y.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("fit: x and y must be finite")
    if (x <= 0).any():
        raise ValueError(f"fit: x must be > 0 (got min {x.min()})")
    xs = np.unique(x)
    if xs.size < 3:
        raise ValueError(f"fit: needs at least 3 distinct x values, got {xs.size}")
    names = list(CURVES if curves is None else curves)
    bad = [c for c in names if c not in CURVES]
    if bad:
        raise ValueError(f"fit: unknown curves {bad}; expected some of {list(CURVES)}")
    n = x.size
    fits, scores, cv = {}, {}, {}
    for name in names:
        k = CURVES[name]
        if xs.size < k + 1:
            continue
        fits[name] = _fit_one(name, x, y)
        err = []
        for v in xs:  # leave one x (all its seeds) out
            keep = x != v
            p = _fit_one(name, x[keep], y[keep], restarts=1)
            err.append((curve(name, p, x[~keep]) - y[~keep]) ** 2)
        mse = float(CV_REDUCE(np.concatenate(err)))
        cv[name] = math.sqrt(mse)
        scores[name] = math.log(max(mse, 1e-300)) + 2.0 * k / n
    # the simplest curve within SIMPLER_MARGIN of the lowest score (a one-standard-error
    # rule: power_law with b -> 0 mimics log_linear, a wide sigmoid a line)
    low = min(scores.values())
    best = min((c for c in scores if scores[c] <= low + SIMPLER_MARGIN), key=CURVES.get)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if np.unique(x[idx]).size < CURVES[best] + 1:
            continue
        boot.append(_fit_one(best, x[idx], y[idx], restarts=1))
    params = fits[best]
    ci = {k: (float(np.percentile([b[k] for b in boot], 2.5)),
              float(np.percentile([b[k] for b in boot], 97.5))) if boot else (v, v)
          for k, v in params.items()}
    phase = None
    if best == "sigmoid":
        # "clearly": ahead of every smooth curve by the margin (the broken power law, a kink
        # itself, may come close to a step and need only be beaten)
        others = [s for c, s in scores.items() if c in SMOOTH]
        resid = y - curve("sigmoid", params, x)
        sd = float(np.sqrt(np.mean(resid ** 2)))
        width = 2 * math.log(9.0) / params["k"]  # decades
        R = float(np.log10(xs[-1] / xs[0]))
        if ((not others or scores["sigmoid"] <= min(others) - PHASE_MARGIN)
                and width <= PHASE_WIDTH * R and xs[0] <= params["x0"] <= xs[-1]
                and abs(params["hi"] - params["lo"]) > 4 * sd):
            # a jump sharper than the spacing of the knob values cannot be placed inside the
            # gap around x0 (a noise-free step bootstraps to one x0): the interval spans it
            lo, hi = ci["x0"]
            below, above = float(xs[xs <= params["x0"]][-1]), float(xs[xs >= params["x0"]][0])
            if width < math.log10(above / below):
                lo, hi = min(lo, below), max(hi, above)
            phase = (lo, params["x0"], hi)
    return Fit(best=best, params=params, ci=ci, phase_change=phase, scores=scores, cv_rmse=cv,
               fits=fits, boot=boot, n=n)
