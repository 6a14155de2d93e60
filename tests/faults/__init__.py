"""Fault-injection suite: real processes on 127.0.0.1 (issue 3)."""
