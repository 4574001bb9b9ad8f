"""Benchmark of the production-shaped stack (`make bench`): Envoy, N server processes, PostgreSQL, Redis."""
