"""A real Postgres server for the tests and the benchmarks: Debian's
``postgresql`` binaries (``initdb``, ``pg_ctl``, ``postgres``), a cluster in a
temporary directory, listening on 127.0.0.1 and a free port only.

Postgres refuses to run as root, and CI runs as root: then the cluster
belongs to an unprivileged system user made for it (``squirepg``) and every
server command runs through ``runuser``. TCP connections need the superuser's
password (scram-sha-256), which the ``SQUIRE_STORE_PASSWORD_FILE`` the
server writes holds, so the store's own way of finding a password is what
the tests use; the unix socket in the cluster's directory trusts, for
``psql`` in ``sql()``.

    server = Postgres.create()       # initdb + start; fails if initdb is missing
    server.url("db")                 # postgresql://postgres@127.0.0.1:PORT/db
    server.stop(); server.start()    # for fault tests: the same data, the same port
    server.destroy()
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "squirepg"
SUPERUSER = "postgres"
PASSWORD = "squire-test-password"
INSTALL = "apt-get install -y postgresql (as root; .ci/run does it where missing)"


def bin_dir() -> Path:
    """The newest /usr/lib/postgresql/*/bin holding initdb, or $SQUIRE_PG_BIN."""
    if given := os.environ.get("SQUIRE_PG_BIN"):
        candidates = [given]
    else:
        found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
        candidates = [str(Path(p).parent) for p in
                      sorted(found, key=lambda p: int(Path(p).parts[-3]))]
    for directory in reversed(candidates):
        if (Path(directory) / "initdb").exists():
            return Path(directory)
    raise RuntimeError(
        "Postgres is not installed: no initdb in "
        f"{os.environ.get('SQUIRE_PG_BIN') or '/usr/lib/postgresql/*/bin'}; {INSTALL}"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_root() -> bool:
    return os.geteuid() == 0


def _ensure_user() -> None:
    if subprocess.run(["id", "-u", USER], capture_output=True, check=False).returncode == 0:
        return
    done = subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                           "/usr/sbin/nologin", USER], capture_output=True, text=True, check=False)
    if done.returncode and "already exists" not in done.stderr:
        raise RuntimeError(f"cannot create the user {USER} to run Postgres as: {done.stderr}")


class Postgres:
    """One cluster: ``create()`` makes and starts it, ``destroy()`` removes it."""

    def __init__(self, root: Path, port: int, bin_: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = port
        self.bin = bin_
        self.log = root / "postgres.log"
        self.password_file = root / "password"
        self.host = "127.0.0.1"

    @classmethod
    def create(cls, **settings: str) -> Postgres:
        bin_ = bin_dir()
        root = Path(tempfile.mkdtemp(prefix="squire-pg-"))
        server = cls(root, free_port(), bin_)
        try:
            server._init(settings)
            for attempt in range(3):
                try:
                    server.start()
                    break
                except RuntimeError:  # the free port was taken meanwhile?
                    if attempt == 2 or "already in use" not in server.log.read_text():
                        raise
                    server.port = free_port()
                    with open(server.data / "postgresql.conf", "a") as f:
                        f.write(f"port = {server.port}\n")  # the last setting wins
        except BaseException:
            server.destroy()
            raise
        return server

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", USER, "--"] if _as_root() else []
        done = subprocess.run([*prefix, *argv], capture_output=True, text=True, check=False,
                              cwd=self.root)
        if check and done.returncode:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: "
                               f"{done.stdout}{done.stderr}\n{tail}")
        return done

    def _init(self, settings: dict[str, str]) -> None:
        if _as_root():
            _ensure_user()
            shutil.chown(self.root, USER, USER)
        pwfile = self.root / "initdb-password"
        pwfile.write_text(PASSWORD + "\n")
        self.password_file.write_text(PASSWORD + "\n")
        if _as_root():
            shutil.chown(pwfile, USER, USER)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                  "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
                  "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions")
        pwfile.unlink()
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "max_connections": "200",
            "shared_buffers": "'64MB'",
            "logging_collector": "off",
            **settings,
        }
        with open(self.data / "postgresql.conf", "a") as f:
            f.writelines(f"{key} = {value}\n" for key, value in conf.items())

    # -- lifecycle, for fault tests ---------------------------------------------------

    def start(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                  "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` ends every connection and checkpoints; ``immediate`` is
        a crash: no checkpoint, the WAL replays at the next start."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60",
                  "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def running(self) -> bool:
        return self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "status",
                         check=False).returncode == 0

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            if self.data.exists() and self.running():
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    # -- access -------------------------------------------------------------------------

    def url(self, database: str = "postgres", user: str = SUPERUSER) -> str:
        """A URL without the password: stores read it from the environment."""
        return f"postgresql://{user}@{self.host}:{self.port}/{database}"

    def env(self) -> dict[str, str]:
        """What a process needs in its environment to log in."""
        return {"SQUIRE_STORE_PASSWORD_FILE": str(self.password_file)}

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run SQL through psql over the unix socket (trusted); returns the
        unaligned, tuples-only output."""
        done = subprocess.run(
            [str(self.bin / "psql"), "-h", str(self.root), "-p", str(self.port), "-U", SUPERUSER,
             "-d", database, "-v", "ON_ERROR_STOP=1", "-X", "-A", "-t", "-q", "-c", statement],
            capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"psql {statement!r}: {done.stderr.strip()}")
        return done.stdout.strip()

    def create_database(self, name: str) -> str:
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)
