"""The development stack behind `make run`: Envoy config rendering, a process supervisor. Never imported by the server."""
