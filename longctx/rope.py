"""Rotary position embedding (Su et al. 2021) with Hugging Face's scaling types.

    y = rope(x, positions, theta=1e4, scaling=RopeScalingConfig(type="yarn", ...))

The frequencies of the static types (``none``, ``linear``, ``ntk``, ``yarn``, ``llama3``)
are computed once in float64 numpy from the formulas of
``transformers.modeling_rope_utils`` (see :mod:`longctx.rope_config`);
``dynamic`` depends on the length of the call and is computed in the graph.
The tests compare the logits of imported checkpoints against ``transformers``
at 600 tokens, where the scaled bands matter.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from longctx.rope_config import RopeScalingConfig, ntk_theta


def _as_section(scaling: RopeScalingConfig | None) -> RopeScalingConfig:
    if scaling is None:
        return RopeScalingConfig()
    if not isinstance(scaling, RopeScalingConfig):
        raise TypeError(f"rope scaling={scaling!r}: expected a RopeScalingConfig or None "
                        "(position interpolation by f: RopeScalingConfig(type='linear', factor=f))")
    return scaling


def _yarn_mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def rope_frequencies(head_dim: int, theta: float, scaling) -> tuple[np.ndarray, float]:
    """``(inv_freq [head_dim / 2] float64, attention_factor)`` of a static scaling type."""
    s = _as_section(scaling)
    D = head_dim
    exponents = np.arange(0, D, 2, dtype=np.float64) / D  # [D/2]
    inv = 1.0 / theta ** exponents
    if s.type == "none":
        return inv, 1.0
    if s.type == "linear":
        return inv / s.factor, 1.0
    if s.type == "ntk":
        return 1.0 / ntk_theta(theta, s.factor, D) ** exponents, 1.0
    L, f = s.original_max_position_embeddings, s.factor
    if s.type == "llama3":
        low_wl, high_wl = L / s.low_freq_factor, L / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > low_wl, inv / f, inv)
        smooth = (L / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return np.where(medium, (1 - smooth) * out / f + smooth * out, out), 1.0
    if s.type == "yarn":
        if s.attention_factor is not None:
            att = s.attention_factor
        elif s.mscale and s.mscale_all_dim:
            att = _yarn_mscale(f, s.mscale) / _yarn_mscale(f, s.mscale_all_dim)
        else:
            att = _yarn_mscale(f)

        def correction_dim(rotations):  # the dimension that turns `rotations` times over L
            return D * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, D - 1)
        if low == high:
            high += 0.001  # as HF: no zero-width ramp
        ramp = np.clip((np.arange(D // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolate = 1 - ramp  # 1: keep the frequency (fast dims), 0: interpolate (slow dims)
        return inv / f * (1 - extrapolate) + inv * extrapolate, att
    raise ValueError(f"rope scaling type {s.type!r} has no static frequencies")


def _inv_freq(head_dim: int, theta: float, s: RopeScalingConfig, positions):
    """Frequencies ``[D/2]`` float32 (and the cos/sin factor) for a call at ``positions``."""
    if s.type != "dynamic":
        inv, att = rope_frequencies(head_dim, theta, s)
        return jnp.asarray(inv, jnp.float32), att
    D, L, f = head_dim, s.original_max_position_embeddings, s.factor
    T = jnp.maximum(jnp.max(positions) + 1, L).astype(jnp.float32)  # HF: max(seq_len, L)
    base = theta * (f * T / L - (f - 1)) ** (D / (D - 2))
    return 1.0 / base ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D), 1.0


def rope(x, positions, *, theta: float = 10_000.0, scaling: RopeScalingConfig | None = None,
         layout: str = "half"):
    """Rotary position embedding on ``x [B, S, H, D]`` at ``positions [B, S]``.

    ``positions`` are absolute token positions (they continue across segments and
    decode steps). ``scaling``: a :class:`~longctx.rope_config.RopeScalingConfig`
    (None: plain RoPE).
    ``dynamic`` reads the length from the largest position of the call, as HF
    does from ``position_ids``. ``layout``: ``half`` rotates the pairs
    ``(x_i, x_{i+D/2})`` (GPT-NeoX / HF Llama: rotate_half), ``interleaved`` the
    pairs ``(x_{2i}, x_{2i+1})`` (GPT-J, Meta's original Llama).
    """
    s = _as_section(scaling)
    D = x.shape[-1]
    inv_freq, att = _inv_freq(D, theta, s, positions)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, D/2]
    cos = (jnp.cos(angles) * att)[:, :, None, :]
    sin = (jnp.sin(angles) * att)[:, :, None, :]
    xf = x.astype(jnp.float32)
    if layout == "half":
        x1, x2 = jnp.split(xf, 2, axis=-1)
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    elif layout == "interleaved":
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xf.shape)
    else:
        raise ValueError(f"rope {layout=}; expected 'half' or 'interleaved'")
    return out.astype(x.dtype)
