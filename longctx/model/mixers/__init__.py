"""Flax token mixers. Each one implements the state protocol::

    init_state(batch_size, dtype) -> State              # pytree of fixed shapes
    __call__(x, *, positions, state=None, segment_ids=None) -> (y, new_state)

``x [B, S, E]`` is one segment; ``positions [B, S]`` its absolute token
positions; with ``state=None`` the segment is the whole sequence and
``new_state`` is None. The model driver (``longctx.model.transformer``) scans
segments carrying every layer's state. Registered in
``longctx.attention.registry.BACKENDS``.
"""
