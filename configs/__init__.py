"""Shipped YAML configs: the embedded world, backbone presets, run configs and real-data recipes.

Read them through :func:`config_path`, which works from a wheel and from an editable install alike.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def config_path(*parts: str) -> Path:
    """Path of a shipped config file, e.g. ``config_path("world", "default.yaml")``."""
    path = Path(str(resources.files(__name__).joinpath(*parts)))
    if not path.exists():
        raise FileNotFoundError(f"no shipped config {'/'.join(parts)} (looked in {path.parent})")
    return path
