"""Example operations for a custom worker image (see Dockerfile beside this).

tests/deploy runs ``squire-worker`` with ``SQUIRE_OPS=my_ops`` and this folder
on PYTHONPATH, as the extended image does, and checks it becomes ready.
"""

from __future__ import annotations

from squire import monoid, operation


@operation("word_count")
def word_count(text: str) -> int:
    return len(text.split())


@monoid("max", empty=0)
def largest(a: int, b: int) -> int:
    return max(a, b)
