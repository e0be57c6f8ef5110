"""Config section ``inherit``: distillation from a frozen parent in the trainer (jax-free).

Knowledge inheritance by distillation (Qin et al. 2022, "Knowledge Inheritance for
Pre-trained Language Models"): the child trains on ``(1 - a_t) CE + a_t T^2 KL(parent_T ||
child_T)`` with ``a_0 = distill_alpha`` decayed linearly to 0 over ``distill_steps``
(:mod:`longctx.train.distill`). ``python -m longctx.inherit --method distill`` writes this
section with ``distill_alpha = ratio``; it combines with weight inheritance (any method).
"""

from __future__ import annotations

from dataclasses import dataclass

from longctx.errors import require


@dataclass(frozen=True)
class InheritConfig:
    parent: str | None = None  # run directory of the frozen parent (config.yaml + checkpoints)
    distill_alpha: float = 0.0  # a_0: weight of the KL term at step 0; 0: no distillation
    distill_steps: int = 0  # a_t decays linearly from a_0 to 0 over these steps; 0: constant
    temperature: float = 1.0  # T of both softmaxes; the KL is scaled by T^2 (Hinton et al. 2015)

    def validate(self, prefix: str = "inherit") -> None:
        require(0.0 <= self.distill_alpha <= 1.0,
                f"{prefix}.distill_alpha={self.distill_alpha} must be in [0, 1]")
        require(self.distill_steps >= 0, f"{prefix}.distill_steps={self.distill_steps} "
                                         "must be >= 0")
        require(self.temperature > 0, f"{prefix}.temperature={self.temperature} must be > 0")
        require(self.distill_alpha == 0 or self.parent is not None,
                f"{prefix}.distill_alpha={self.distill_alpha} needs {prefix}.parent (a run "
                "directory)")

    def alpha(self, step: int):
        """``a_t``: ``distill_alpha * max(0, 1 - step / distill_steps)`` (works on arrays)."""
        if not self.distill_steps:
            return self.distill_alpha + 0 * step
        frac = 1.0 - step / self.distill_steps
        return self.distill_alpha * (frac * (frac > 0))
