"""RWKV-6 and RWKV-7 recurrences: naive reference, recurrent and chunkwise forms.

One signature for every form (``form``), names as in flash-linear-attention::

    rwkv6(r, k, v, w, u, *, scale=None, initial_state=None, output_final_state=False,
          chunk_size=64, form="chunk") -> (o, final_state)
    rwkv7(r, w, k, v, a, b, *, scale=None, initial_state=None, output_final_state=False,
          chunk_size=64, form="chunk") -> (o, final_state)

Layouts::

    r, k, w, a, b [B, T, H, K]    v [B, T, H, V]    o [B, T, H, V] (dtype of v)
    u [H, K]                      (RWKV-6 bonus of the current token)
    initial_state, final_state [B, H, K, V] float32

``w`` is the log decay (``w <= 0``, finite). ``S_t`` is ``[K, V]``; a key vector
acts on its rows. Recurrences::

    RWKV-6 (Peng et al. 2024, "Eagle and Finch"):
        o_t = (scale r_t)^T (S_{t-1} + diag(u) k_t v_t^T)
        S_t = diag(exp w_t) S_{t-1} + k_t v_t^T
    RWKV-7 (Peng et al. 2025, "Goose"; the generalized delta rule):
        S_t = diag(exp w_t) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
        o_t = (scale r_t)^T S_t

``a_t^T S_{t-1}`` is a row ``[V]``: the transition is ``diag(exp w_t) + b_t a_t^T``
applied to the *undecayed* previous state, which is fla's ``h = h * w + (h a) b^T
+ v k^T`` in its ``[V, K]`` layout transposed (RWKV-7 uses ``a = -kappa``,
``b = kappa * a_gate``: a delta-rule erase along ``kappa``). ``scale`` defaults
to ``K ** -0.5`` for both (as fla's ``chunk_rwkv6`` / ``chunk_rwkv7``; the RWKV
layers pass ``scale=1``).

Forms (exact in exact arithmetic; the tests compare them against a float64 loop
on outputs, final states and every gradient):

* RWKV-6 is per-key gated linear attention one step behind:
  with ``k'_t = k_{t-1}``, ``v'_t = v_{t-1}``, ``g'_t = w_{t-1}`` (``k'_1 = 0``,
  ``g'_1 = 0``) the state ``S'_t`` of ``linear_attention(r, k', v', g=g')``
  equals ``S_{t-1}``, so ``o_t = r_t S'_t + (r_t . (u * k_t)) v_t`` and
  ``S_T = diag(exp w_T) S'_T + k_T v_T^T``. Every form of
  :func:`~longctx.backends.linear.ops.linear_attention` (``chunk``,
  ``recurrent``, ``parallel``; also its sequence-parallel state passing) is
  therefore a form of RWKV-6, through the public signature only.
* RWKV-7 ``"recurrent"``: ``lax.scan`` over time (the decoding form).
  ``"chunk"``: ``lax.scan`` over chunks of ``C`` tokens carrying the float32
  state, one ``jax.checkpoint`` per chunk. Inside a chunk with start state
  ``S_0`` and in-chunk cumulative log decay ``G_t = sum_{s<=t} w_s`` (``[K]``;
  ``G_0 = 0``), unrolling gives
  ``S_t = e^{G_t} S_0 + sum_{j<=t} e^{G_t - G_j} (k_j v_j^T + b_j u_j^T)``
  with the pseudo-values ``u_j = S_{j-1}^T a_j`` (``[V]``), which solve the unit
  lower-triangular system (the WY / UT representation, as fla's generalized
  delta rule chunk)::

      (I - A_ab) U = A_ak V + (a * e^{G_{i-1}}) S_0
      A_xy[i, j] = sum_d x_id y_jd e^{G_{i-1,d} - G_{j,d}}    (j < i)

  then ``O = (r * e^G) S_0 + M_rk V + M_rb U`` with ``M_xy[i, j] = sum_d x_id
  y_jd e^{G_{i,d} - G_{j,d}}`` (``j <= i``), and ``S_C`` as above with ``t = C``.
  The per-key decays are the explicit ``[C, C, K]`` tensor, masked *before* the
  exp so every exponent is ``<= 0`` (a decay of -8 per step at any length stays
  finite; ``e^{-G}`` alone would overflow): the working set is ``C^2 K`` per
  head. ``(I - A_ab)^{-1}`` is :func:`unit_lower_inverse` (products of
  ``I + N^(2^i)``, ``N`` nilpotent: ``log2 C`` matmul pairs, no LAPACK call).
  ``"parallel"``: the chunk form with one chunk of the whole sequence.
  The last chunk is padded with ``w = 0`` and ``r = k = v = a = b = 0``, which
  leaves the state unchanged.

Inputs of any float dtype are computed in float32; ``o`` is cast back to the
dtype of ``v``. Gradients are plain JAX autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longctx.backends.linear.ops import linear_attention

RWKV7_FORMS = ("chunk", "recurrent", "parallel")


def _f32(x):
    return None if x is None else jnp.asarray(x).astype(jnp.float32)


def _check(name, shapes, v, initial_state, extra=None):
    """``shapes``: name -> array that must be ``[B, T, H, K]`` like the first one."""
    (n0, x0), *rest = shapes.items()
    if x0.ndim != 4 or v.ndim != 4 or v.shape[:3] != x0.shape[:3]:
        raise ValueError(f"{name} expects {n0} [B, T, H, K] and v [B, T, H, V]; got "
                         f"{n0}.shape={x0.shape} {v.shape=}")
    for n, x in rest:
        if x.shape != x0.shape:
            raise ValueError(f"{name}: {n} must have the shape of {n0} [B, T, H, K] = "
                             f"{x0.shape}; got {n}.shape={x.shape}")
    B, T, H, K = x0.shape
    if extra is not None and extra.shape != (H, K):
        raise ValueError(f"{name}: u must be [H, K] = {(H, K)}; got u.shape={extra.shape}")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[3]):
        raise ValueError(f"{name}: initial_state must be [B, H, K, V] = "
                         f"{(B, H, K, v.shape[3])}; got {initial_state.shape=}")


def _shift(x):
    """``x'_t = x_{t-1}``, ``x'_1 = 0`` along time: ``[B, T, ...]``."""
    return jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)


# ----------------------------------------------------------------------------
# RWKV-6
# ----------------------------------------------------------------------------


def rwkv6(r, k, v, w, u, *, scale=None, initial_state=None, output_final_state=False,
          chunk_size=64, form="chunk"):
    """RWKV-6 ("Finch") time mixing; see the module docstring for shapes and forms.

    Returns ``(o [B, T, H, V], final_state [B, H, K, V] float32 or None)``.
    """
    _check("rwkv6", {"r": r, "k": k, "w": w}, v, initial_state, extra=u)
    out_dtype = v.dtype
    scale = r.shape[-1] ** -0.5 if scale is None else scale
    r, k, v, w, u, S0 = map(_f32, (r, k, v, w, u, initial_state))
    o, S = linear_attention(r, _shift(k), _shift(v), g=_shift(w), scale=scale,
                            initial_state=S0, output_final_state=output_final_state,
                            chunk_size=chunk_size, form=form)  # S'_t = S_{t-1}
    bonus = jnp.einsum("bthk,hk,bthk->bth", r, u, k) * scale  # r_t . (u * k_t)
    o = o.astype(jnp.float32) + bonus[..., None] * v
    if output_final_state:
        S = (jnp.exp(w[:, -1])[..., None] * S
             + jnp.einsum("bhk,bhv->bhkv", k[:, -1], v[:, -1]))
    return o.astype(out_dtype), (S if output_final_state else None)


def rwkv6_reference(r, k, v, w, u, *, scale=None, initial_state=None):
    """The naive loop over time (Python, float32): ``(o, final_state)``."""
    B, T, H, K = r.shape
    scale = K ** -0.5 if scale is None else scale
    r, k, v, w, u = map(_f32, (r, k, v, w, u))
    S = (jnp.zeros((B, H, K, v.shape[-1]), jnp.float32) if initial_state is None
         else _f32(initial_state))
    outs = []
    for t in range(T):
        kv = jnp.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outs.append(jnp.einsum("bhk,bhkv->bhv", scale * r[:, t], S + u[:, :, None] * kv))
        S = jnp.exp(w[:, t])[..., None] * S + kv
    return jnp.stack(outs, axis=1), S


# ----------------------------------------------------------------------------
# RWKV-7
# ----------------------------------------------------------------------------


def unit_lower_inverse(N):
    """``(I - N)^{-1}`` for a strictly lower-triangular ``N [..., C, C]``.

    ``N`` is nilpotent (``N^C = 0``), so ``(I - N)^{-1} = sum_i N^i =
    prod_{i < log2 C} (I + N^(2^i))``: ``2 ceil(log2 C)`` batched matmuls.
    """
    C = N.shape[-1]
    inv = jnp.eye(C, dtype=N.dtype) + N
    P = N
    m = 2
    while m < C:
        P = P @ P
        inv = inv + inv @ P
        m *= 2
    return inv


def _rwkv7_block(r, w, k, v, a, b, S0):
    """One chunk in the WY / UT form (module docstring): ``(o [B, H, L, V], S_L)``.

    Inputs ``[B, H, L, K or V]`` float32, ``r`` already scaled; ``S0 [B, H, K, V]``.
    """
    L = r.shape[-2]
    G = jnp.cumsum(w, axis=-2)  # [B, H, L, K], non-increasing
    Gp = G - w  # G_{i-1}
    idx = jnp.arange(L)
    strict = (idx[:, None] > idx[None, :])[:, :, None]  # [L, L, 1]: j < i
    incl = (idx[:, None] >= idx[None, :])[:, :, None]  # j <= i
    # masked before the exp: above the diagonal the exponents are positive
    E1 = jnp.exp(jnp.where(strict, Gp[..., :, None, :] - G[..., None, :, :], -jnp.inf))
    E2 = jnp.exp(jnp.where(incl, G[..., :, None, :] - G[..., None, :, :], -jnp.inf))

    def pair(x, y, E):  # [B, H, L, L]
        return jnp.einsum("bhid,bhjd,bhijd->bhij", x, y, E)

    rhs = (jnp.einsum("bhij,bhjv->bhiv", pair(a, k, E1), v)
           + jnp.einsum("bhik,bhkv->bhiv", a * jnp.exp(Gp), S0))
    U = jnp.einsum("bhij,bhjv->bhiv", unit_lower_inverse(pair(a, b, E1)), rhs)  # [B,H,L,V]
    o = (jnp.einsum("bhik,bhkv->bhiv", r * jnp.exp(G), S0)
         + jnp.einsum("bhij,bhjv->bhiv", pair(r, k, E2), v)
         + jnp.einsum("bhij,bhjv->bhiv", pair(r, b, E2), U))
    to_end = jnp.exp(G[..., -1:, :] - G)  # [B, H, L, K], exponents <= 0
    S_L = (jnp.exp(G[..., -1, :])[..., None] * S0
           + jnp.einsum("bhjk,bhjv->bhkv", k * to_end, v)
           + jnp.einsum("bhjk,bhjv->bhkv", b * to_end, U))
    return o, S_L


def _rwkv7_step(S, x):
    r, w, k, v, a, b = x  # [B, H, K] (v: [B, H, V])
    sa = jnp.einsum("bhk,bhkv->bhv", a, S)  # a_t^T S_{t-1}
    S = (jnp.exp(w)[..., None] * S + b[..., :, None] * sa[..., None, :]
         + k[..., :, None] * v[..., None, :])
    return S, jnp.einsum("bhk,bhkv->bhv", r, S)


def rwkv7(r, w, k, v, a, b, *, scale=None, initial_state=None, output_final_state=False,
          chunk_size=64, form="chunk"):
    """RWKV-7 ("Goose") generalized delta rule; see the module docstring.

    Returns ``(o [B, T, H, V], final_state [B, H, K, V] float32 or None)``.
    """
    if form not in RWKV7_FORMS:
        raise ValueError(f"rwkv7: unknown {form=!r}; expected one of {RWKV7_FORMS}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"rwkv7: {chunk_size=} must be a positive int")
    _check("rwkv7", {"r": r, "w": w, "k": k, "a": a, "b": b}, v, initial_state)
    out_dtype = v.dtype
    B, T, H, K = r.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    r, w, k, v, a, b, S0 = map(_f32, (r, w, k, v, a, b, initial_state))
    r = r * scale
    S0 = jnp.zeros((B, H, K, V), jnp.float32) if S0 is None else S0
    xs = (r, w, k, v, a, b)
    if form == "recurrent":
        S, o = jax.lax.scan(_rwkv7_step, S0, tuple(jnp.moveaxis(x, 1, 0) for x in xs))
        o = jnp.moveaxis(o, 0, 1)  # [B, T, H, V]
    else:
        C = T if form == "parallel" else max(1, min(chunk_size, T))
        N = -(-T // C)
        pad = N * C - T

        def chunks(x):  # [B, T, H, D] -> [N, B, H, C, D]; padding zeros (w = 0)
            x = jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)])
            return jnp.moveaxis(x.reshape(B, N, C, H, -1), (1, 3), (0, 2))

        @jax.checkpoint  # keep only the state at each chunk start for the backward pass
        def body(S, x):
            o, S = _rwkv7_block(*x, S)
            return S, o

        S, o = jax.lax.scan(body, S0, tuple(map(chunks, xs)))  # o [N, B, H, C, V]
        o = jnp.moveaxis(o, (0, 2), (1, 3)).reshape(B, N * C, H, V)[:, :T]
    return o.astype(out_dtype), (S if output_final_state else None)


def rwkv7_reference(r, w, k, v, a, b, *, scale=None, initial_state=None):
    """The naive loop over time (Python, float32): ``(o, final_state)``."""
    B, T, H, K = r.shape
    scale = K ** -0.5 if scale is None else scale
    r, w, k, v, a, b = map(_f32, (r, w, k, v, a, b))
    S = (jnp.zeros((B, H, K, v.shape[-1]), jnp.float32) if initial_state is None
         else _f32(initial_state))
    outs = []
    for t in range(T):
        S = (jnp.exp(w[:, t])[..., None] * S
             + jnp.einsum("bhk,bhj,bhjv->bhkv", b[:, t], a[:, t], S)
             + jnp.einsum("bhk,bhv->bhkv", k[:, t], v[:, t]))
        outs.append(jnp.einsum("bhk,bhkv->bhv", scale * r[:, t], S))
    return jnp.stack(outs, axis=1), S
