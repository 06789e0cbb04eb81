"""Fixtures for the edge tests (defined in edge_testkit.py, which tests also import)."""

from edge_testkit import bms, cloud, processes, proxy_factory, start_agent

__all__ = ["bms", "cloud", "processes", "proxy_factory", "start_agent"]
