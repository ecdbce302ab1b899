"""A project-local PostgreSQL cluster for `hipcall-ingest run` on a bare machine, as ingest/localnode.py
is for RabbitMQ: when a consumer's `dsn` names PostgreSQL on this machine and nothing answers there,
`run` makes a cluster under `.run/postgres/` (initdb, kept between runs), starts it on the DSN's port
(pg_ctl), creates the DSN's database, and stops it when `run` stops. A development helper: never
imported by the request path.

PostgreSQL's server refuses to run as root: as root, the cluster's files belong to the `postgres` user
(Debian's package makes it) and its commands run as that user (runuser).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from .errors import NodeError
from .localnode import reachable

BIN_GLOB = "/usr/lib/postgresql/*/bin"
DATABASE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
HOW_TO_GET_IT = "install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`), or point the dsn at a running one"


TOOLS = ("initdb", "pg_ctl", "psql", "createdb")


def binaries() -> dict[str, str]:
    """Where each tool is: Debian keeps them per version off PATH (/usr/lib/postgresql/15/bin), the
    newest version first; else on PATH."""
    versions = sorted(Path("/").glob(BIN_GLOB.lstrip("/")), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    for directory in reversed(versions):
        if all((directory / tool).exists() for tool in TOOLS):
            return {tool: str(directory / tool) for tool in TOOLS}
    found = {tool: shutil.which(tool) for tool in TOOLS}
    if all(found.values()):
        return {tool: str(path) for tool, path in found.items()}
    raise NodeError(f"no PostgreSQL binaries ({', '.join(TOOLS)}) found: {HOW_TO_GET_IT}")


def local_target(dsn: str) -> tuple[int, str, str] | None:
    """(port, user, database) when `dsn` is PostgreSQL on this machine without a password; else None."""
    url = urlsplit(dsn)
    if url.scheme not in ("postgresql", "postgres") or url.hostname not in ("127.0.0.1", "localhost") or url.password:
        return None
    return url.port or 5432, url.username or "postgres", url.path.lstrip("/") or "postgres"


class LocalPostgres:
    """One cluster in `directory`, listening on 127.0.0.1:port and a socket in the directory."""

    def __init__(self, directory: Path, port: int) -> None:
        self.bin = binaries()
        self.dir = Path(directory).resolve()
        self.data = self.dir / "data"
        self.port = port
        self._as_root = os.geteuid() == 0

    def _run(self, *command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_root else []
        return subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=timeout)

    def start(self, user: str, database: str) -> None:
        if not DATABASE_RE.fullmatch(database) or not DATABASE_RE.fullmatch(user):
            raise NodeError(f"the dsn's user and database must be plain names to be made here, got {user!r}, {database!r}")
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise NodeError("PostgreSQL will not run as root and there is no `postgres` user to run it as: "
                                + HOW_TO_GET_IT) from None
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            done = self._run(self.bin["initdb"], "-D", str(self.data), "-U", user, "--auth=trust", "-E", "UTF8")
            if done.returncode != 0:
                raise NodeError(f"initdb failed: {(done.stderr or done.stdout).strip()[-300:]}")
        done = self._run(self.bin["pg_ctl"], "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w",
                         "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir}", "start")
        if done.returncode != 0 or not reachable("127.0.0.1", self.port):
            raise NodeError(f"PostgreSQL did not start: {(done.stderr or done.stdout).strip()[-300:]} "
                            f"(its log: {self.dir / 'server.log'})")
        exists = self._run(self.bin["psql"], "-h", "127.0.0.1", "-p", str(self.port), "-U", user, "-d", "postgres",
                           "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{database}'")
        if exists.stdout.strip() != "1":
            made = self._run(self.bin["createdb"], "-h", "127.0.0.1", "-p", str(self.port), "-U", user, database)
            if made.returncode != 0:
                raise NodeError(f"createdb {database} failed: {made.stderr.strip()[-300:]}")

    def stop(self) -> None:
        self._run(self.bin["pg_ctl"], "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=120)
