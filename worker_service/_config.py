"""The worker's configuration: one frozen value, built by the CLI or by hand."""

from __future__ import annotations

import enum
import os
import socket
from dataclasses import dataclass, field


class ExecutorKind(enum.StrEnum):
    PROCESS = "process"  # CPU-bound operations: one spawned child per slot
    THREAD = "thread"    # operations that release the GIL or wait on I/O
    INLINE = "inline"    # trivial operations, run on the event loop itself


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def default_concurrency() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker connects, what it offers and how it runs tasks.

    ``prefetch`` None means "as many as ``concurrency``". The orchestrator
    keeps at most ``window`` (concurrency + prefetch) unreported tasks here.
    """

    ops: tuple[str, ...]
    orchestrator: str = "127.0.0.1:50051"
    concurrency: int = field(default_factory=default_concurrency)
    executor: ExecutorKind = ExecutorKind.PROCESS
    prefetch: int | None = None
    worker_id: str = field(default_factory=default_worker_id)
    drain_grace: float = 30.0
    abort_memory: float = 300.0
    log_level: str = "INFO"
    log_format: LogFormat = LogFormat.TEXT
    # Reconnect backoff: from reconnect_min doubling to reconnect_max, jittered.
    reconnect_min: float = 0.1
    reconnect_max: float = 5.0
    # How long to wait for the orchestrator's Welcome after the hello.
    handshake_timeout: float = 10.0
    # /metrics, /healthz and /readyz; 0 = no HTTP endpoint (the CLI defaults to 9465).
    metrics_port: int = 0
    metrics_host: str = "0.0.0.0"
    # TLS to the orchestrator (see _credentials): PEM file paths. A client
    # certificate is for an orchestrator run with --require-worker-client-cert.
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # The worker token: read from token_file on every connect, or given here.
    token_file: str | None = None
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.ops, str):
            raise TypeError("ops is a tuple of module names, not a string")
        if not self.ops:
            raise ValueError("name at least one ops module")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.prefetch is not None and self.prefetch < 0:
            raise ValueError(f"prefetch must not be negative, got {self.prefetch}")
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")
        for name in ("drain_grace", "abort_memory", "reconnect_min", "handshake_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must be at least reconnect_min")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.token is not None and self.token_file is not None:
            raise ValueError("give the worker token or a token file, not both")

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca is not None or self.tls_cert is not None

    @property
    def effective_prefetch(self) -> int:
        return self.concurrency if self.prefetch is None else self.prefetch

    @property
    def window(self) -> int:
        """The most unreported tasks the orchestrator may hand this worker."""
        return self.concurrency + self.effective_prefetch
