"""The scripts under deploy/ (not a package) loaded as modules, once per test session."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def load(relative: str) -> ModuleType:
    """deploy/<relative> as a module, loaded once and cached in sys.modules."""
    name = "piaa_deploy_" + Path(relative).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DEPLOY / relative)
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def load_launch() -> ModuleType:
    """deploy/triton/launch.py: the Triton container's entry point."""
    return load("triton/launch.py")
