"""The conversion table: longctx parameter paths (per-layer view) <-> HF tensor names.

One :class:`Entry` per longctx parameter, with the HF tensors it comes from and
the transform between the layouts (numpy, jax-free). Paths are those of
``longctx.model.layout.to_per_layer`` (``("blocks", i, "mixer", "wq")``), never
the model's own tree, so that stacked (scanned) layers need no change here.

HF ``nn.Linear`` weights are ``[out, in]``; longctx keeps ``[in, out]`` with the
heads split out: ``wq [E, H, D]`` is ``q_proj.weight [H*D, E]`` transposed and
reshaped, ``wo [H, D, E]`` is ``o_proj.weight [E, H*D]`` transposed; expert
stacks ``[X, ...]`` are the ``X`` per-expert tensors of the Hub layout
(``block_sparse_moe.experts.{j}.w1`` for Mixtral, ``mlp.experts.{j}.gate_proj``
for Qwen3-MoE), which transformers 5 also writes. HF RoPE is rotate-half; a
model with ``rope_layout=interleaved`` has its q/k head dimension permuted on
export.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from longctx.config import ModelConfig

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry


@dataclass(frozen=True)
class Entry:
    path: tuple  # in the per-layer view of the model's pure dict
    hf: tuple[str, ...]  # HF tensor names (several: one per expert, stacked)
    kind: str  # copy | T | in_heads | out_heads | experts_T
    heads: int = 0  # in_heads / out_heads: number of heads
    permute: bool = False  # q/k of an interleaved-RoPE model: head_dim order differs from HF

    def from_hf(self, arrays: list[np.ndarray], shape: tuple) -> np.ndarray:
        """HF tensors -> the longctx array of ``shape``."""
        if self.kind == "experts_T":
            return np.stack([a.T for a in arrays]).reshape(shape)
        (a,) = arrays
        if self.kind == "copy":
            return a.reshape(shape)
        if self.kind == "T":
            return np.ascontiguousarray(a.T)
        if self.kind == "in_heads":  # [H*D, E] -> [E, H, D]
            return np.ascontiguousarray(a.T).reshape(shape)
        if self.kind == "out_heads":  # [E, H*D] -> [H, D, E]
            return np.ascontiguousarray(a.T).reshape(shape)
        raise ValueError(self.kind)

    def to_hf(self, x: np.ndarray) -> list[np.ndarray]:
        """The longctx array -> HF tensors (contiguous)."""
        if self.permute:  # interleaved pairs (2i, 2i+1) -> rotate-half pairs (i, i + D/2)
            if self.kind == "copy" and self.heads:  # flat bias [H*D]
                x = x.reshape(self.heads, -1)
            D = x.shape[-1]
            perm = np.concatenate([np.arange(0, D, 2), np.arange(1, D, 2)])
            x = x[..., perm]
        if self.kind == "experts_T":
            return [np.ascontiguousarray(e.T) for e in x]
        if self.kind == "copy":
            return [np.ascontiguousarray(x.reshape(-1) if self.heads else x)]
        if self.kind == "T":
            return [np.ascontiguousarray(x.T)]
        if self.kind == "in_heads":  # [E, H, D] -> [H*D, E]
            return [np.ascontiguousarray(x.reshape(x.shape[0], -1).T)]
        if self.kind == "out_heads":  # [H, D, E] -> [E, H*D]
            return [np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)]
        raise ValueError(self.kind)


def table(m: ModelConfig, architecture: str) -> list[Entry]:
    """Every parameter of a longctx model of config ``m`` and its HF tensors."""
    a, H, K = m.attention, m.n_heads, m.n_kv_heads
    perm = m.rope_layout == "interleaved"
    moe_layers = set(m.moe.layers(m.n_layers))
    out = [Entry(("embed", "embedding"), ("model.embed_tokens.weight",), "copy"),
           Entry(("final_norm", "scale"), ("model.norm.weight",), "copy")]
    if not m.tie_embeddings:
        out.append(Entry(("lm_head",), ("lm_head.weight",), "T"))
    for i in range(m.n_layers):
        p, b = f"model.layers.{i}.", ("blocks", i)
        at = p + "self_attn."
        out += [Entry(b + ("attn_norm", "scale"), (p + "input_layernorm.weight",), "copy"),
                Entry(b + ("mlp_norm", "scale"), (p + "post_attention_layernorm.weight",), "copy"),
                Entry(b + ("mixer", "wq"), (at + "q_proj.weight",), "in_heads", H, perm),
                Entry(b + ("mixer", "wk"), (at + "k_proj.weight",), "in_heads", K, perm),
                Entry(b + ("mixer", "wv"), (at + "v_proj.weight",), "in_heads", K),
                Entry(b + ("mixer", "wo"), (at + "o_proj.weight",), "out_heads", H)]
        if a.qkv_bias:
            out += [Entry(b + ("mixer", "bq"), (at + "q_proj.bias",), "copy", H, perm),
                    Entry(b + ("mixer", "bk"), (at + "k_proj.bias",), "copy", K, perm),
                    Entry(b + ("mixer", "bv"), (at + "v_proj.bias",), "copy")]
        if a.out_bias:
            out.append(Entry(b + ("mixer", "bo"), (at + "o_proj.bias",), "copy"))
        if a.qk_norm:
            out += [Entry(b + ("mixer", "q_norm", "scale"), (at + "q_norm.weight",), "copy",
                          0, perm),
                    Entry(b + ("mixer", "k_norm", "scale"), (at + "k_norm.weight",), "copy",
                          0, perm)]
        if i not in moe_layers:
            out += [Entry(b + ("mlp", "w_gate"), (p + "mlp.gate_proj.weight",), "T"),
                    Entry(b + ("mlp", "w_up"), (p + "mlp.up_proj.weight",), "T"),
                    Entry(b + ("mlp", "w_down"), (p + "mlp.down_proj.weight",), "T")]
            continue
        X = range(m.moe.num_experts)
        if architecture == "MixtralForCausalLM":
            e = p + "block_sparse_moe."
            names = {"router": e + "gate.weight", "w_gate": e + "experts.{}.w1.weight",
                     "w_up": e + "experts.{}.w3.weight", "w_down": e + "experts.{}.w2.weight"}
        else:
            e = p + "mlp."
            names = {"router": e + "gate.weight", "w_gate": e + "experts.{}.gate_proj.weight",
                     "w_up": e + "experts.{}.up_proj.weight",
                     "w_down": e + "experts.{}.down_proj.weight"}
        out.append(Entry(b + ("mlp", "router"), (names["router"],), "T"))
        for w in ("w_gate", "w_up", "w_down"):
            out.append(Entry(b + ("mlp", w), tuple(names[w].format(j) for j in X), "experts_T"))
    return out


def hf_shapes(entry: Entry, shape: tuple) -> list[tuple]:
    """The HF tensor shapes an entry expects, from the longctx ``shape``."""
    if entry.kind == "experts_T":
        return [tuple(reversed(shape[1:]))] * shape[0]
    if entry.kind == "copy":
        return [(int(np.prod(shape)),) if entry.heads else tuple(shape)]
    if entry.kind == "T":
        return [tuple(reversed(shape))]
    if entry.kind == "in_heads":
        return [(int(np.prod(shape[1:])), shape[0])]
    return [(shape[-1], int(np.prod(shape[:-1])))]  # out_heads
