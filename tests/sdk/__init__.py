"""Tests of the Python SDK (clients/python/squire) against a fake orchestrator."""
