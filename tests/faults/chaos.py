"""`make chaos`: a randomized soak on loopback, bounded by CHAOS_SECONDS (default 1800).

The same deployment as the state machine (private Redis with AOF `always`, gateway with
a steerable wall clock, proxy, real agent, recording device, projector). Operations are
drawn at random, traffic-heavy; every `CHAOS_ROUND_S` seconds (default 60) the faults
are healed, the system drained and all six invariants checked. The safety half is
checked after every operation. Exit 0 when every round was clean, 1 otherwise; the
invariant report of each round is printed.

    CHAOS_SECONDS=300 make chaos
    CHAOS_SEED=7 .venv/bin/python tests/faults/chaos.py
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent.parent)]

from faults_world import World  # noqa: E402

# Traffic dominates; each fault is rarer. Weights, not probabilities.
WEIGHTS = {
    "send_ws": 30,
    "send_http": 10,
    "link_down": 2,
    "link_up": 4,
    "link_cut": 3,
    "kill_agent": 2,
    "kill_gateway": 1,
    "restart_redis": 1,
    "clock_step": 2,
}


def main() -> int:
    total_s = float(os.environ.get("CHAOS_SECONDS", "1800"))
    round_s = float(os.environ.get("CHAOS_ROUND_S", "60"))
    seed = int(os.environ.get("CHAOS_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    print(f"chaos: {total_s:.0f} s, rounds of {round_s:.0f} s, seed {seed}", flush=True)
    operations, weights = list(WEIGHTS), list(WEIGHTS.values())
    deadline = time.monotonic() + total_s
    clean, rounds = True, 0
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        while time.monotonic() < deadline:
            rounds += 1
            world = World(Path(tmp) / f"round-{rounds}")
            try:
                round_end = min(deadline, time.monotonic() + round_s)
                while time.monotonic() < round_end:
                    operation = rng.choices(operations, weights)[0]
                    world.run(operation)
                    safety = world.safety()
                    if not safety.ok:
                        print(f"round {rounds}: safety violated after {operation}\n{safety}")
                        clean = False
                        break
                    time.sleep(rng.uniform(0.02, 0.3))
                report = world.settle()
                clean = clean and report.ok
                print(f"round {rounds}: {world.counts}\n{report}", flush=True)
                if not report.ok:
                    print(f"round {rounds}: operations in order: {' '.join(world.history)}")
                    print(f"round {rounds}: process logs in {world.processes.log_dir}")
                    for proc in world.processes.procs:
                        print(f"----- {proc.name} -----\n{proc.log()[-3000:]}")
            finally:
                world.close()
    print(f"chaos: {rounds} round(s), seed {seed}: {'CLEAN' if clean else 'VIOLATIONS FOUND'}")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
