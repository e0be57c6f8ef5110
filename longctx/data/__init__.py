"""Data pipelines and synthetic tasks for longctx."""
