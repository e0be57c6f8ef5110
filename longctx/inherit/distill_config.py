"""Config section ``distill``: distillation from a frozen parent in the trainer (jax-free).

Knowledge inheritance by distillation (Qin et al. 2022, "Knowledge Inheritance for
Pre-trained Language Models"): the child trains on ``(1 - a_t) CE + a_t T^2 KL(parent_T ||
child_T)`` with ``a_0 = distill.alpha`` decayed linearly to 0 over ``distill.steps``
(:mod:`longctx.train.distill`). ``python -m longctx.inherit --method distill`` writes this
section with ``alpha = ratio``; it combines with weight inheritance (any method).
"""

from __future__ import annotations

from dataclasses import dataclass

from longctx.errors import require


@dataclass(frozen=True)
class DistillConfig:
    parent: str | None = None  # run directory of the frozen parent (config.yaml + checkpoints)
    alpha: float = 0.0  # a_0: weight of the KL term at step 0; 0: no distillation
    steps: int = 0  # a_t decays linearly from a_0 to 0 over these steps; 0: constant
    temperature: float = 1.0  # T of both softmaxes; the KL is scaled by T^2 (Hinton et al. 2015)

    @property
    def enabled(self) -> bool:
        return self.alpha > 0

    def validate(self, prefix: str = "distill") -> None:
        require(0.0 <= self.alpha <= 1.0, f"{prefix}.alpha={self.alpha} must be in [0, 1]")
        require(self.steps >= 0, f"{prefix}.steps={self.steps} must be >= 0")
        require(self.temperature > 0, f"{prefix}.temperature={self.temperature} must be > 0")
        require(self.alpha == 0 or self.parent is not None,
                f"{prefix}.alpha={self.alpha} needs {prefix}.parent (a run directory)")

    def alpha_at(self, step: int):
        """``a_t``: ``alpha * max(0, 1 - step / steps)`` (works on arrays)."""
        if not self.steps:
            return self.alpha + 0 * step
        frac = 1.0 - step / self.steps
        return self.alpha * (frac * (frac > 0))
