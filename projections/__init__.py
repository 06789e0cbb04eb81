"""Projector workers: PostgreSQL audit tables and timeout verdicts from the ledger."""
