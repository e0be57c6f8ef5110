"""Config section of RoPE scaling, ``model.rope_scaling`` (jax-free).

The types are Hugging Face's (``transformers.modeling_rope_utils``), with the
same parameter names and defaults, so that a checkpoint's ``rope_parameters``
(``rope_scaling`` before transformers 5) map one to one; ``ntk`` is the one type
Hugging Face does not have:

* ``none``: plain RoPE, ``inv_freq_i = theta^(-2i/D)``.
* ``linear``: position interpolation (Chen et al. 2023), ``inv_freq / factor``.
* ``ntk``: NTK-aware scaling (bloc97 2023; eq. 16 of the YaRN paper): a fixed base
  change, ``theta`` becomes ``theta * factor ^ (D / (D - 2))`` (``D`` the head dimension),
  which keeps the fastest frequency and divides the slowest by ``factor``. Hugging Face
  has no such type (it is the static form of ``dynamic``); a model exports as plain RoPE
  with that ``rope_theta`` (:func:`ntk_theta`).
* ``dynamic``: dynamic NTK (bloc97 / emozilla): when the sequence (max position
  + 1 of the call) exceeds ``original_max_position_embeddings = L``, ``theta``
  becomes ``theta * (factor * T / L - (factor - 1)) ^ (D / (D - 2))``.
* ``yarn``: YaRN (Peng et al. 2023, arXiv 2309.00071): interpolated and
  extrapolated frequencies blended by a linear ramp over the dimensions between
  the ``beta_fast`` / ``beta_slow`` rotation counts at length L, and cos/sin
  multiplied by ``attention_factor`` (default ``0.1 ln(factor) + 1``, or
  ``mscale`` / ``mscale_all_dim`` as DeepSeek).
* ``llama3``: Llama 3.1's band-wise scaling: wavelengths above
  ``L / low_freq_factor`` divided by ``factor``, below ``L / high_freq_factor``
  kept, smoothly interpolated in between.

Position interpolation by ``f`` is ``{type: linear, factor: f}``.
"""

from __future__ import annotations

from dataclasses import dataclass

from longctx.errors import require

ROPE_TYPES = ("none", "linear", "ntk", "dynamic", "yarn", "llama3")
ROPE_LAYOUTS = ("half", "interleaved")  # rotate-half (GPT-NeoX, HF Llama) | pairs (GPT-J, Meta)


@dataclass(frozen=True)
class RopeScalingConfig:
    type: str = "none"  # none | linear | ntk | dynamic | yarn | llama3 (module docstring)
    factor: float = 1.0  # context extension factor (linear, ntk, dynamic, yarn, llama3)
    # Pre-training length L (dynamic, yarn, llama3); HF: original_max_position_embeddings
    # (dynamic: the model's max_position_embeddings).
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn: rotations at L below which dimensions are interpolated ...
    beta_slow: float = 1.0  # ... and above which they are extrapolated (a ramp in between)
    attention_factor: float | None = None  # yarn: cos/sin multiplier; None: from factor / mscale
    mscale: float | None = None  # yarn (DeepSeek): attention_factor = m(factor, mscale) / ...
    mscale_all_dim: float | None = None  # ... m(factor, mscale_all_dim), m = 0.1 m ln(s) + 1
    truncate: bool = True  # yarn: floor / ceil the correction range

    def validate(self, prefix: str = "model.rope_scaling") -> None:
        require(self.type in ROPE_TYPES,
                f"{prefix}.type={self.type!r}; expected one of {ROPE_TYPES}")
        require(self.factor > 0, f"{prefix}.factor={self.factor} must be > 0")
        # a base change by factor < 1 would shorten the wavelengths: not an extension
        require(self.type != "ntk" or self.factor >= 1,
                f"{prefix}.factor={self.factor} with type 'ntk' must be >= 1 (the context "
                "extension factor)")
        if self.type in ("dynamic", "yarn", "llama3"):
            L = self.original_max_position_embeddings
            require(L is not None and L >= 1,
                    f"{prefix}.type={self.type!r} needs {prefix}.original_max_position_embeddings "
                    f"(the pre-training length) >= 1; got {L}")
        if self.type == "llama3":
            require(self.high_freq_factor > self.low_freq_factor > 0,
                    f"{prefix}.high_freq_factor={self.high_freq_factor} must be > "
                    f"low_freq_factor={self.low_freq_factor} > 0")
        if self.type == "yarn":
            require(self.beta_fast > 0 and self.beta_slow > 0,
                    f"{prefix}.beta_fast={self.beta_fast}, beta_slow={self.beta_slow} must be > 0")


def ntk_theta(theta: float, factor: float, head_dim: int) -> float:
    """NTK-aware RoPE base: ``theta * factor ^ (D / (D - 2))`` (YaRN paper, eq. 16).

    The exponent makes the slowest frequency ``theta^(-(D - 2) / D)`` exactly ``factor``
    times slower (interpolated) while the fastest, ``1``, is kept (extrapolated).
    """
    if head_dim < 4 or head_dim % 2:
        raise ValueError(f"ntk_theta: {head_dim=} must be even and >= 4")
    return float(theta) * float(factor) ** (head_dim / (head_dim - 2))
