"""Run every benchmark module and print one line per figure.

Each module in `bench/` with a `main(argv) -> int` runs in turn; `python -m bench NAME`
runs only the named ones. Figures are printed as `name: value unit (details)`.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench

ORDER = ["latency", "throughput", "idle_edges", "projector"]


def main(argv: list[str]) -> int:
    available = {m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_")}
    wanted = [a for a in argv if not a.startswith("-")] or [n for n in ORDER if n in available]
    wanted += sorted(available - set(ORDER) - {"harness"}) if not argv else []
    status = 0
    for name in wanted:
        if name not in available or name == "harness":
            print(f"bench: no benchmark named {name!r}; have {sorted(available - {'harness'})}", file=sys.stderr)
            return 2
        module = importlib.import_module(f"bench.{name}")
        status |= int(module.main([a for a in argv if a.startswith("-")]) or 0)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
