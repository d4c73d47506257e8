"""Retrieval quality through the public API: `ragctl eval retrieval` on SciFact by default.

  .venv/bin/python benchmarks/retrieval_eval.py                     # the full train split
  .venv/bin/python benchmarks/retrieval_eval.py --max-queries 200 --no-references
  .venv/bin/python benchmarks/retrieval_eval.py --data DIR --split test --save-runs

Starts a local stack (per-user limits raised for the run), loads the corpus in batches, runs
every judged query in each mode (vector, text, hybrid) with k = 100, and reports nDCG@10,
recall@100, MRR@10 and latency p50/p95 per mode beside in-process BM25 and exact MiniLM
references computed in the same run. Any option of `ragctl eval retrieval` passes through
and overrides these defaults; the JSON goes to benchmarks/results/.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS  # noqa: E402
from ragctl.cli import main  # noqa: E402

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def run(argv: list[str]) -> int:
    defaults = ["--data", str(SCIFACT), "--split", "train"]
    split = argv[argv.index("--split") + 1] if "--split" in argv[:-1] else "train"
    data = Path(argv[argv.index("--data") + 1]) if "--data" in argv[:-1] else SCIFACT
    output = RESULTS / f"retrieval_eval-{data.name}-{split}.json"
    return main(["eval", "retrieval", *defaults, "--output", str(output), *argv])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
