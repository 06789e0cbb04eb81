"""msgspec types for every wire message and ledger event."""
