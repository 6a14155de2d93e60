"""The kernel both services and the SDK share, imported by its public names.

- :mod:`squire_kernel.operations` -- the operation registry: ``operation``,
  ``monoid``, ``Registry``, ``AbortSignal``
- :mod:`squire_kernel.serde` -- payload encoding (JSON, MessagePack)
- :mod:`squire_kernel.retry` -- retry strategies and fatal strategies
- :mod:`squire_kernel.errors` -- what an operation or a payload can raise
- :mod:`squire_kernel.wire` -- proto helpers both services use (the
  generated wire types themselves are :mod:`squire.api.v1`)
- :mod:`squire_kernel.metrics` -- lock-free counter and histogram families
- :mod:`squire_kernel.logs` -- structured logging
- :mod:`squire_kernel.loop` -- the event-loop choice (asyncio or uvloop)
- :mod:`squire_kernel.listen` -- one-line errors for a port that cannot be bound
- :mod:`squire_kernel.flags` -- flags that are also ``SQUIRE_<FLAG>`` variables

Nothing here does I/O at import; nothing here imports a service.
"""

__version__ = "0.1.0"
