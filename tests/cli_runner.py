"""Run an entry point's CLI with exactly a given config object, through the ``--config`` YAML path a user takes."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import yaml

from jaxrlhf.cli import config_to_dict


def run_cli_with(cli: Callable[[list[str]], int], cfg: Any) -> int:
    """``cli(["--config", file])`` where the file holds every field of ``cfg``; returns the exit code."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config_to_dict(cfg), f)
    try:
        return cli(["--config", f.name])
    finally:
        os.unlink(f.name)
