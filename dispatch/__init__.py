"""The `dispatch` command line, deployment settings, demo and benchmark."""
