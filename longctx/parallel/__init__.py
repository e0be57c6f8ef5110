"""Device mesh, logical-axis sharding rules, (later) context parallelism."""
