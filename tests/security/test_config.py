"""Start-up checks: plaintext is refused off loopback without --insecure,
inconsistent security flags stop the services with a clear message, and the
flags are settable through SQUIRE_* environment variables."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import procs
import pytest

from orchestrator_service._security import (
    InsecureListenError,
    SecurityConfig,
    check_listen,
    is_loopback,
)
from worker_service._cli import parse_config

from .conftest import WORKER_TOKEN, write_lines
from .pki import Pki


def orchestrator(*args: str, env: dict[str, str] | None = None,
                 ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [procs.entry_point("squire-orchestrator"), "--port", "0", "--metrics-port", "0", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("how", ["flag", "env"])
def test_plaintext_off_loopback_is_refused_without_insecure(how: str) -> None:
    result = (orchestrator("--host", "0.0.0.0") if how == "flag"
              else orchestrator(env={"SQUIRE_HOST": "0.0.0.0"}))
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "refusing to listen in plaintext on '0.0.0.0'" in output
    assert "--insecure" in output and "--tls-cert" in output


@pytest.mark.parametrize(("args", "message"), [
    (("--tls-cert", "cert.pem"), "--tls-cert and --tls-key go together"),
    (("--require-worker-client-cert",), "--require-worker-client-cert needs"),
    (("--worker-token-file", "/nonexistent/tokens"), "No such file"),
])
def test_bad_security_flags_stop_the_orchestrator(args: tuple[str, ...], message: str) -> None:
    result = orchestrator("--host", "127.0.0.1", *args)
    assert result.returncode == 2
    assert message in result.stdout + result.stderr


def test_unusable_pem_stops_the_orchestrator(tmp_path: Path, pki: Pki) -> None:
    junk = write_lines(tmp_path / "junk.pem", "not a certificate")
    result = orchestrator("--host", "127.0.0.1", "--tls-cert", str(junk),
                          "--tls-key", str(pki.server_key))
    assert result.returncode == 2
    assert "holds no PEM data" in result.stdout + result.stderr


def test_check_listen(caplog: pytest.LogCaptureFixture, pki: Pki) -> None:
    caplog.set_level(logging.INFO, logger="squire.orchestrator")
    with pytest.raises(InsecureListenError):
        check_listen("::", SecurityConfig())
    check_listen("0.0.0.0", SecurityConfig(insecure=True))
    assert "plaintext on a non-loopback address (--insecure)" in caplog.text
    check_listen("0.0.0.0", SecurityConfig(tls_cert=str(pki.server_cert),
                                           tls_key=str(pki.server_key)))
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "", "10.0.0.7", "orchestrator.example"):
        assert not is_loopback(host), host


def test_worker_flags_and_environment(tmp_path: Path, pki: Pki) -> None:
    token_file = write_lines(tmp_path / "token", WORKER_TOKEN)
    config = parse_config(
        ["--ops", "squire_examples.ops", "--tls-ca", str(pki.ca), "--tls-cert",
         str(pki.client_cert), "--tls-key", str(pki.client_key), "--token-file", str(token_file)],
        environ={})
    assert config.uses_tls and config.token_file == str(token_file)
    config = parse_config([], environ={"SQUIRE_OPS": "squire_examples.ops",
                                       "SQUIRE_TLS_CA": str(pki.ca),
                                       "SQUIRE_WORKER_TOKEN": WORKER_TOKEN})
    assert config.uses_tls and config.token == WORKER_TOKEN
    assert WORKER_TOKEN not in repr(config)
    assert not parse_config(["--ops", "m"], environ={}).uses_tls


@pytest.mark.parametrize(("args", "message"), [
    (("--tls-cert", "x.pem"), "tls_cert and tls_key go together"),
    (("--token-file", "/nonexistent/token"), "cannot read"),
    (("--tls-ca", "/nonexistent/ca.pem"), "cannot read"),
])
def test_bad_worker_flags_exit_with_usage(args: tuple[str, ...], message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config(["--ops", "squire_examples.ops", *args], environ={})
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_worker_token_file_holds_one_token(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    two = write_lines(tmp_path / "two", WORKER_TOKEN, WORKER_TOKEN + "x")
    with pytest.raises(SystemExit):
        parse_config(["--ops", "m", "--token-file", str(two)], environ={})
    err = capsys.readouterr().err
    assert "exactly one token" in err and WORKER_TOKEN not in err
