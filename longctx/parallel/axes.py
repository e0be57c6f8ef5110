"""Mesh axis names, logical axis names and the default rules table (jax-free).

The config schema validates ``mesh.*`` against these names without importing jax;
``longctx.parallel.sharding`` turns them into ``PartitionSpec``s.
"""

MESH_AXES = ("data", "fsdp", "tensor", "expert", "sequence")
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab",
                "expert", "layers")

# Default rules (MaxText-style): batch over every data-parallel axis, parameters'
# embed dimension over fsdp (ZeRO-3), heads / mlp / vocab over tensor, experts over
# expert, the sequence over sequence (context parallelism), the stacked layers over none.
DEFAULT_RULES = {
    "batch": ["data", "fsdp", "expert"],
    "length": ["sequence"],
    "embed": ["fsdp"],
    "heads": ["tensor"],
    "kv_heads": ["tensor"],
    "head_dim": [],
    "mlp": ["tensor"],
    "vocab": ["tensor"],
    "expert": ["expert"],
    "layers": [],  # the stacked layer axis of model.scan_layers: never split by default
}
