"""Ctrl-C in a terminal during a map: ``squire demo`` prints one line and
exits 130, and nothing of the embedded services is left running."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time

import grpc
import procs
import pytest
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """A command on a pseudo-terminal, so ^C is the terminal's SIGINT to its
    foreground process group, as at a keyboard."""

    def __init__(self, argv: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: SIGINT at its default, as in a shell
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execv(argv[0], argv)
        self.output = b""

    def read(self, seconds: float) -> bool:
        """Collect output for up to ``seconds``; False once the terminal closed."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    return False
                if not data:
                    return False
                self.output += data
        return True

    def text(self) -> str:
        return ANSI.sub(b"", self.output).decode(errors="replace").replace("\r", "")

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.read(0.1) and time.monotonic() < deadline:
            pass
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)


def test_ctrl_c_during_the_demo_map_is_one_line_and_exit_130() -> None:
    # No workers: the map waits for one (up to the orchestrator's no-worker
    # timeout), so the ^C surely lands while the directive runs.
    term = Terminal([procs.entry_point("squire"), "demo", "--workers", "0", "--no-progress"])
    found = procs.wait_until(
        lambda: term.read(0.05) and re.search(r"orchestrator at (127\.0\.0\.1:\d+)", term.text()),
        timeout=60, message="the demo's orchestrator address")
    target = found.group(1)
    with grpc.insecure_channel(target) as channel:
        status = pb_grpc.StatusServiceStub(channel)
        procs.wait_until(lambda: status.GetStatus(pb.GetStatusRequest(), timeout=5).directives,
                         message="the demo's directive")
        before = term.text()
        os.write(term.fd, b"\x03")  # the terminal's interrupt character
        code = term.wait(timeout=60)
    assert code == 130, term.text()
    after = term.text()[len(before):]
    # the terminal echoes the ^C itself
    lines = [line.replace("^C", "") for line in after.splitlines() if line.replace("^C", "")]
    assert lines == ["squire: interrupted"], term.text()
    # the embedded orchestrator is gone with the demo
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError):
        pb_grpc.StatusServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=2)


SCRIPT = """
import sys
import squire
from squire import IndexedStream

with squire.embedded(workers=1) as cluster:
    print("target", cluster.target, flush=True)
    IndexedStream.from_iterable([2.0] * {n}).map("sleep").run(cluster.client)
"""


@pytest.mark.parametrize("n", [20, 100])  # a session call, and a call of its own
def test_ctrl_c_in_a_script_shows_no_grpc_internals(tmp_path, n: int) -> None:  # type: ignore[no-untyped-def]
    """A user's own script, uncaught: Python's short traceback from the
    script's run() line (not a dozen frames of grpc's wait loop), death by
    SIGINT (130 in a shell), the directive cancelled, the services gone."""
    script = tmp_path / "my_script.py"
    script.write_text(SCRIPT.format(n=n))
    term = Terminal([sys.executable, str(script)])
    found = procs.wait_until(
        lambda: term.read(0.05) and re.search(r"target (127\.0\.0\.1:\d+)", term.text()),
        timeout=60, message="the script's embedded cluster")
    target = found.group(1)
    with grpc.insecure_channel(target) as channel:
        status = pb_grpc.StatusServiceStub(channel)
        # A task done: the script is surely past its imports and start-up,
        # waiting for results (where a user's ^C lands).
        procs.wait_until(
            lambda: any(d.progress.completed
                        for d in status.GetStatus(pb.GetStatusRequest(), timeout=5).directives),
            timeout=60, message="the script's first result")
        before = term.text()
        os.write(term.fd, b"\x03")
        code = term.wait(timeout=60)
    assert code == -signal.SIGINT, term.text()
    after = term.text()[len(before):].replace("^C", "")
    lines = [line for line in after.splitlines() if line.strip()]
    assert lines[0] == "Traceback (most recent call last):", after
    assert lines[-1] == "KeyboardInterrupt", after
    assert "my_script.py" in after and "grpc" not in after, after
    assert len(lines) <= 10, after  # three frames: the script, run(), the re-raise
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError):
        pb_grpc.StatusServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=2)
