"""The `dispatch` command line and composition root (app.py), tokens, demo and replay."""
