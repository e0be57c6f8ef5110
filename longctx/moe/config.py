"""Config section of the Mixture-of-Experts feed-forward, ``model.moe`` (jax-free).

MaxText's names where they exist. The layer (``longctx.moe.layer.MoE``) reads this
section plus explicit sizes (``d_model``, ``mlp_dim``) only.
"""

from __future__ import annotations

from dataclasses import dataclass

from longctx.errors import require

ROUTERS = ("softmax_topk", "topk_softmax", "sigmoid")
DISPATCHES = ("dropless", "capacity")
DROPLESS_IMPLS = ("auto", "blocks", "ragged_dot")


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 0  # routed experts E; 0: dense SwiGLU feed-forward in every layer
    num_experts_per_tok: int = 2  # k: experts each token is routed to (token choice)
    expert_dim: int | None = None  # width of each expert (fine-grained: < mlp_dim); None: mlp_dim
    shared_experts: int = 0  # always-on experts: a dense SwiGLU of width shared_experts*expert_dim
    every: int = 1  # after first_dense_layers, every k-th layer is MoE (2: layers n+1, n+3, ...)
    first_dense_layers: int = 0  # the first n layers keep the dense SwiGLU
    router: str = "softmax_topk"  # softmax_topk | topk_softmax (softmax over the k) | sigmoid
    norm_topk_prob: bool = False  # softmax_topk, sigmoid: renormalise the k weights to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' combine weights
    n_groups: int = 1  # group-limited routing: experts split into n_groups equal groups, and ...
    topk_groups: int = 1  # ... each token picks its experts inside its topk_groups best groups
    jitter_noise: float = 0.0  # training mode only: router input *= U(1 - eps, 1 + eps); 0: off
    dispatch: str | None = None  # dropless | capacity; null: capacity iff capacity_factor > 0
    capacity_factor: float = 0.0  # <= 0: dropless; > 0: ceil(cf * T * k / E) slots/expert/sequence
    dropless_impl: str = "auto"  # auto (TPU: ragged_dot, CPU / GPU: blocks) | blocks | ragged_dot
    load_balance_loss_weight: float = 0.01  # x Switch loss E * sum_i f_i P_i (aux moe_lb_loss)
    router_z_loss_weight: float = 0.0  # x ST-MoE z-loss mean(logsumexp(logits)^2) (aux moe_z_loss)
    routed_bias_update_rate: float = 0.0  # aux-free balancing: bias += rate*sign(mean_load - load)
    expert_parallel: bool = False  # experts over the `expert` mesh axis (if > 1), all-to-all
    expert_choice: bool = False  # experts pick their tokens (Zhou et al. 2022): sees later tokens
    acknowledge_expert_choice_leaks: bool = False  # required by expert_choice: it leaks the future

    def layers(self, n_layers: int) -> list[int]:
        """Indices of the MoE layers: after ``first_dense_layers``, every ``every``-th layer
        (``every=2, first_dense_layers=1``: layers 2, 4, 6, ...)."""
        if self.num_experts == 0:
            return []
        return [i for i in range(n_layers) if i >= self.first_dense_layers
                and (i - self.first_dense_layers + 1) % self.every == 0]

    @property
    def resolved_dispatch(self) -> str:
        """``dispatch`` if set, else ``capacity`` for ``capacity_factor > 0`` and ``dropless``."""
        return self.dispatch or ("capacity" if self.capacity_factor > 0 else "dropless")

    def validate(self, n_layers: int, prefix: str = "model.moe") -> None:
        require(self.num_experts >= 0, f"{prefix}.num_experts={self.num_experts} must be >= 0")
        if self.num_experts == 0:
            return
        E, k = self.num_experts, self.num_experts_per_tok
        require(1 <= k <= E, f"{prefix}.num_experts_per_tok={k} must be in [1, num_experts={E}]")
        require((self.expert_dim or 1) >= 1 and self.shared_experts >= 0,
                f"{prefix}.expert_dim={self.expert_dim} must be >= 1 or null, "
                f"shared_experts={self.shared_experts} >= 0")
        require(self.every >= 1 and self.first_dense_layers >= 0,
                f"{prefix}.every={self.every} must be >= 1, "
                f"first_dense_layers={self.first_dense_layers} >= 0")
        require(bool(self.layers(n_layers)),
                f"{prefix}.first_dense_layers={self.first_dense_layers}, every={self.every} "
                f"leave no MoE layer among model.n_layers={n_layers}; use "
                f"{prefix}.num_experts=0 for dense")
        require(self.router in ROUTERS,
                f"{prefix}.router={self.router!r}; expected one of {ROUTERS}")
        require(self.n_groups >= 1 and E % self.n_groups == 0
                and 1 <= self.topk_groups <= self.n_groups,
                f"{prefix}.n_groups={self.n_groups} must divide num_experts={E} and "
                f"topk_groups={self.topk_groups} be in [1, n_groups]")
        require(k <= self.topk_groups * (E // self.n_groups),
                f"{prefix}.num_experts_per_tok={k} > topk_groups={self.topk_groups} * "
                f"{E // self.n_groups} experts per group")
        require(self.routed_scaling_factor > 0 and 0 <= self.jitter_noise < 1,
                f"{prefix}.routed_scaling_factor={self.routed_scaling_factor} must be > 0 and "
                f"jitter_noise={self.jitter_noise} in [0, 1)")
        require(min(self.load_balance_loss_weight, self.router_z_loss_weight,
                    self.routed_bias_update_rate) >= 0,
                f"{prefix}.load_balance_loss_weight={self.load_balance_loss_weight}, "
                f"router_z_loss_weight={self.router_z_loss_weight}, "
                f"routed_bias_update_rate={self.routed_bias_update_rate} must be >= 0")
        require(self.dispatch is None or self.dispatch in DISPATCHES,
                f"{prefix}.dispatch={self.dispatch!r}; expected null or one of {DISPATCHES}")
        require(not (self.dispatch == "capacity" and self.capacity_factor <= 0),
                f"{prefix}.dispatch='capacity' needs capacity_factor > 0; got "
                f"{self.capacity_factor}")
        require(not (self.dispatch == "dropless" and self.capacity_factor > 0),
                f"{prefix}.dispatch='dropless' contradicts capacity_factor="
                f"{self.capacity_factor} > 0 (capacity_factor <= 0 means dropless)")
        require(self.dropless_impl in DROPLESS_IMPLS,
                f"{prefix}.dropless_impl={self.dropless_impl!r}; expected one of "
                f"{DROPLESS_IMPLS}")
        if self.expert_choice:
            require(self.acknowledge_expert_choice_leaks,
                    f"{prefix}.expert_choice=true: each expert picks tokens among the whole "
                    "sequence, so an output depends on later tokens -- it leaks the future in "
                    f"this causal LM. Set {prefix}.acknowledge_expert_choice_leaks=true to run "
                    "it anyway")
            require(self.capacity_factor > 0 and not self.expert_parallel
                    and self.routed_bias_update_rate == 0,
                    f"{prefix}.expert_choice=true needs capacity_factor > 0 (got "
                    f"{self.capacity_factor}), expert_parallel=false (got "
                    f"{self.expert_parallel}) and routed_bias_update_rate=0 (got "
                    f"{self.routed_bias_update_rate})")
