"""The command ledger on Redis Streams: the source of truth for every command."""
