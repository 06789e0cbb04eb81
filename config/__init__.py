"""Settings, tracing and log format: what every process is configured with (the ground floor)."""
