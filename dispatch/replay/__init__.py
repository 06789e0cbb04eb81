"""`dispatch replay`: re-run a recorded window of an edge's commands in a sandbox.

window.py reads the recorded window (ledger log or audit tables); schedule.py derives
the happens-before order and spacing; sandbox.py and relay.py run a throwaway gateway,
devices and a real edge agent whose link the replay controls; run.py performs the
schedule; report.py compares; cli.py is the command line. See docs/replay.md.
"""

from dispatch.replay.cli import register
from dispatch.replay.report import Report, Row
from dispatch.replay.run import ReplayOptions, replay
from dispatch.replay.window import Outcome, Recorded, ReplayError

__all__ = [
    "Outcome",
    "Recorded",
    "ReplayError",
    "ReplayOptions",
    "Report",
    "Row",
    "register",
    "replay",
]
