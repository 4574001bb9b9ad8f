"""The development stack behind `make run` (Envoy config, supervisor); the server never imports it."""
