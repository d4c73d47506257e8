"""What the benchmarks share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def report(name: str, result: dict[str, Any]) -> None:
    """Print the result as JSON and keep it in benchmarks/results/<name>.json."""
    RESULTS.mkdir(exist_ok=True)
    text = json.dumps(result, indent=2)
    (RESULTS / f"{name}.json").write_text(text)
    print(text)
