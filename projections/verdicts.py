"""The verdict loop lives in ledger/verdicts.py (it needs Redis only); re-exported here."""

from ledger.verdicts import VerdictConfig, VerdictLoop

__all__ = ["VerdictConfig", "VerdictLoop"]
