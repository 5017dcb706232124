"""The run directory's config.yaml: the config a run trains with, every earlier one kept."""

from __future__ import annotations

from pathlib import Path

import yaml

from gorila_jax.core.config import Config, to_dict
from gorila_jax.io.files import write_atomically


def write_resolved(config: Config, run_dir: Path) -> Path:
    """Write the config the run actually uses into its run directory (config.yaml).

    A different config.yaml already there (the config of an earlier start of this run
    directory) is kept as config.<n>.yaml, n = 1, 2, ... in the order they were replaced,
    so every config the directory was trained with stays on disk.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    if path.exists() and path.read_text() != text:
        number = 1
        while (kept := run_dir / f"config.{number}.yaml").exists():
            number += 1
        path.rename(kept)
    write_atomically(path, text)
    return path
