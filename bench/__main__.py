"""Run every benchmark module and print one line per figure.

Each module in `bench/` with a `main(argv) -> int` runs in turn; `python -m bench NAME`
runs only the named ones. Figures are printed as `name: value unit (details)`.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench

ORDER = [
    "latency",
    "throughput",
    "verdict_lag",
    "idle_edges",
    "projector",
    "frames",
    "metrics_overhead",
]


def main(argv: list[str]) -> int:
    available = {m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_")}
    available.discard("harness")
    names = [a for a in argv if a in available]
    options = [a for a in argv if a not in available]
    if any(not a.startswith("-") and a not in available for a in argv[:1]):
        print(f"bench: no benchmark named {argv[0]!r}; have {sorted(available)}", file=sys.stderr)
        return 2
    wanted = names or [n for n in ORDER if n in available] + sorted(available - set(ORDER))
    status = 0
    for name in wanted:
        module = importlib.import_module(f"bench.{name}")
        status |= int(module.main(options) or 0)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
