"""Where the application finds its configs: the `cast.configs` package, shipped in the wheel.

In a source checkout that package is the repository's configs/ folder (pyproject.toml maps it), so
editing a YAML there takes effect at once; an installed wheel carries its own copy.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CONFIG_DIR = Path(str(files("cast.configs")))
