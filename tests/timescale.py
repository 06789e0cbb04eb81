"""A private PostgreSQL 15 cluster carrying TimescaleDB, started for the tests.

PostgreSQL finds its `lib` and `share` directories relative to its own binary, so a copy
of the machine's installation with the extension unpacked into it runs TimescaleDB while
the system server stays untouched (see shared/timescaledb/README.md).

Where the extension comes from, first match wins:
* `DISPATCH_TIMESCALEDB_TARBALL`: a tarball laid out like a PostgreSQL 15 installation;
* `shared/timescaledb/timescaledb-*-pg15-*.tar.gz` beside the repository (CI places the
  repository next to `shared/`; worktrees sit one level deeper, so parents are searched);
* the system installation itself, when it already has `timescaledb.control`.

`initdb` and `postgres` refuse to run as root: as root, they run as `postgres` (or
`nobody`), which owns the cluster's directory.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from support import free_port

PG_LIB = Path("/usr/lib/postgresql/15")
PG_SHARE = Path("/usr/share/postgresql/15")
REPO = Path(__file__).resolve().parent.parent
TARBALL_ENV = "DISPATCH_TIMESCALEDB_TARBALL"


def find_tarball() -> Path | None:
    override = os.environ.get(TARBALL_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"{TARBALL_ENV}={override} is not a file")
        return path
    for parent in (REPO, *REPO.parents):
        found = sorted((parent / "shared" / "timescaledb").glob("timescaledb-*-pg15-*.tar.gz"))
        if found:
            return found[-1]
    return None


def system_has_timescaledb() -> bool:
    return (PG_SHARE / "extension" / "timescaledb.control").is_file()


def unavailable_reason() -> str | None:
    """Why no TimescaleDB cluster can be started here (None: one can)."""
    if not (PG_LIB / "bin" / "initdb").is_file():
        return f"no PostgreSQL 15 installation at {PG_LIB}"
    if find_tarball() is None and not system_has_timescaledb():
        return (
            "TimescaleDB is not available: no shared/timescaledb/*.tar.gz beside the repository, "
            f"no {TARBALL_ENV}, and the system PostgreSQL has no timescaledb extension"
        )
    return None


def _user() -> tuple[str, int, int] | None:
    """The unprivileged account that runs the cluster (None: the current user can)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return name, entry.pw_uid, entry.pw_gid
    raise RuntimeError("running as root and no `postgres` or `nobody` account to run PostgreSQL")


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


@dataclass
class Installation:
    """PostgreSQL binaries that can load TimescaleDB, and an initdb'ed template cluster."""

    root: Path
    bin: Path

    @classmethod
    def prepare(cls, root: Path) -> Installation:
        tarball = find_tarball()
        if tarball is None:
            return cls(root, PG_LIB / "bin")
        prefix = root / "pg"
        (prefix / "usr/lib/postgresql").mkdir(parents=True)
        (prefix / "usr/share/postgresql").mkdir(parents=True)
        shutil.copytree(PG_LIB, prefix / "usr/lib/postgresql/15", symlinks=True)
        shutil.copytree(PG_SHARE, prefix / "usr/share/postgresql/15", symlinks=True)
        subprocess.run(["tar", "-C", str(prefix), "-xzf", str(tarball)], check=True)
        return cls(root, prefix / "usr/lib/postgresql/15/bin")

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        user = _user()
        command = list(args)
        if user is not None and shutil.which("setpriv"):
            command = ["setpriv", f"--reuid={user[1]}", f"--regid={user[2]}", "--clear-groups"]
            command += list(args)
        elif user is not None:
            command = ["runuser", "-u", user[0], "--", *args]
        return subprocess.run(command, check=True, capture_output=True, text=True, cwd="/")


@dataclass
class Cluster:
    installation: Installation
    data: Path
    port: int
    preload: bool

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/test"

    def start(self) -> None:
        options = [
            f"-c port={self.port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={self.data}",
            "-c fsync=off",
            "-c synchronous_commit=off",
            "-c full_page_writes=off",
            "-c max_connections=200",
            "-c timescaledb.telemetry_level=off",
            f"-c shared_preload_libraries={'timescaledb' if self.preload else ''}",
        ]
        pg_ctl = str(self.installation.bin / "pg_ctl")
        try:
            self.installation.run(
                pg_ctl, "-D", str(self.data), "-l", str(self.data / "log"), "-w", "-t", "60",
                "-o", " ".join(options), "start",
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            log = (self.data / "log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"private PostgreSQL did not start: {exc.stderr}\n{log}") from exc
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE test")

    def stop(self) -> None:
        pg_ctl = str(self.installation.bin / "pg_ctl")
        with contextlib.suppress(subprocess.CalledProcessError):
            self.installation.run(pg_ctl, "-D", str(self.data), "-m", "immediate", "stop")


class Clusters:
    """One installation and template, any number of clusters; all removed by `close`."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dispatch-timescale-"))
        self.clusters: list[Cluster] = []
        try:
            self.installation = Installation.prepare(self.root)
            self.template = self.root / "template"
            self.template.mkdir()
            user = _user()
            if user is not None:
                os.chmod(self.root, 0o755)
                _chown_tree(self.template, user[1], user[2])
            self.installation.run(
                str(self.installation.bin / "initdb"), "-D", str(self.template), "-U", "postgres",
                "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C",
            )  # fmt: skip
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def start(self, *, preload: bool = True) -> Cluster:
        data = self.root / f"data{len(self.clusters)}"
        shutil.copytree(self.template, data, symlinks=True)
        os.chmod(data, 0o700)
        user = _user()
        if user is not None:
            _chown_tree(data, user[1], user[2])
        cluster = Cluster(self.installation, data, free_port(), preload)
        self.clusters.append(cluster)
        cluster.start()
        return cluster

    def close(self) -> None:
        for cluster in self.clusters:
            cluster.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def clusters() -> Iterator[Clusters]:
    made = Clusters()
    try:
        yield made
    finally:
        made.close()
