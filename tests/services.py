"""Real servers for tests and benchmarks: a throw-away PostgreSQL cluster, an S3 endpoint (moto's
server mode), and network namespaces that stand for separate hosts.

    with postgres_cluster(databases=("mlflow", "optuna")) as pg:
        pg.uri("mlflow")              # postgresql+psycopg2://postgres@127.0.0.1:<port>/mlflow
    with s3_endpoint(bucket="mlflow-artifacts") as s3:
        s3.url, s3.env                # http://127.0.0.1:<port>, AWS_* + MLFLOW_S3_ENDPOINT_URL
    with Hosts(["server", "w1", "w2"], hub="server", observer=True) as hosts:
        hosts.run("w1", [...])        # a command on host w1
        hosts.address("server", seen_from="w1")   # 10.77.1.1; from this process: address("server")

Everything started here is stopped and removed when its block ends, whatever ended it.

PostgreSQL: ``initdb`` and ``pg_ctl`` refuse to run as root, so as root they run as the
``postgres`` user (``runuser``). fsync is off (a test's data need not survive a power cut).
``netns=`` starts the postmaster inside a network namespace (``ip netns exec``), listening on
``listen`` there; ``password=`` switches TCP logins to scram-sha-256 for ``allow`` (CIDR), so
a worker on another "host" logs in the way a real one would.

Hosts: one namespace per host; every non-hub host is joined to the hub by its own veth pair
on a /30 of its own (10.77.<i>.0/30; hub end .1, host end .2). Only the hub is reachable from
a host, as in a star network behind one switch. ``link(host, up=False)`` takes a host's link
down (its packets are dropped, TCP connections stall, nothing is reset), ``up=True`` brings
it back.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_server import free_port


def require(why: str | None) -> None:
    """In a test: skip when a service cannot run here (``why``), but fail under CI (CI=true),
    where `.ci/run` installs what these tests need: a skip there would hide a missing step."""
    import pytest

    if why:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must provide this: {why}")
        pytest.skip(why)


# -- PostgreSQL -------------------------------------------------------------------------
def pg_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for cand in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(cand)
    return None


def have_postgres() -> str | None:
    """None when a cluster can be started here, else why not (for a skip message)."""
    missing = [t for t in ("initdb", "pg_ctl", "createdb") if not pg_tool(t)]
    if missing:
        return f"PostgreSQL server binaries not found ({', '.join(missing)}): apt-get install postgresql"
    try:
        import psycopg2  # noqa: F401 - the MLflow server and Optuna need a driver
    except ImportError:
        return "no PostgreSQL driver: pip install psycopg2-binary"
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a 'postgres' user (initdb refuses root)"
    return None


@dataclass
class Postgres:
    host: str
    port: int
    pid: int
    root: Path
    password: str | None = None

    def uri(self, database: str = "mlflow", host: str | None = None, driver: str = "psycopg2") -> str:
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; ask for the driver installed
        auth = f"postgres:{self.password}" if self.password else "postgres"
        return f"postgresql+{driver}://{auth}@{host or self.host}:{self.port}/{database}"


@contextlib.contextmanager
def postgres_cluster(databases: Sequence[str] = ("mlflow",), *, listen: str = "127.0.0.1",
                     netns: str | None = None, password: str | None = None, allow: str | None = None,
                     parent: Path | None = None, max_connections: int = 200) -> Iterator[Postgres]:
    """A throw-away cluster with ``databases`` created; yields a :class:`Postgres`."""
    import pwd

    why = have_postgres()
    if why:
        raise RuntimeError(why)
    initdb, pg_ctl, createdb = (pg_tool(t) for t in ("initdb", "pg_ctl", "createdb"))
    pg = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    if parent is None and os.path.isdir("/dev/shm"):
        parent = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="mlproject-pg-", dir=parent))
    if pg:
        os.chown(root, pg.pw_uid, pg.pw_gid)
    data, port = root / "data", free_port()
    prefix = ["ip", "netns", "exec", netns] if netns else []

    def run(cmd, ns: bool = False):
        cmd = [str(c) for c in cmd]
        if pg:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        if ns:
            cmd = [*prefix, *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")

    started = False
    try:
        init = [initdb, "-D", data, "-U", "postgres", "-E", "UTF8", "--no-sync", "-A", "trust"]
        if password:
            pwfile = root / "pw"
            pwfile.write_text(password + "\n")
            if pg:
                os.chown(pwfile, pg.pw_uid, pg.pw_gid)
            init += ["--pwfile", pwfile, "--auth-local", "trust", "--auth-host", "scram-sha-256"]
        run(init)
        if allow:
            with open(data / "pg_hba.conf", "a") as fh:
                fh.write(f"host all all {allow} {'scram-sha-256' if password else 'trust'}\n")
        opts = (f"-p {port} -k {root} -c listen_addresses='{listen}' -c fsync=off "
                f"-c synchronous_commit=off -c full_page_writes=off -c max_connections={max_connections}")
        started = True
        run([pg_ctl, "-D", data, "-l", root / "postgres.log", "-o", opts, "-w", "-t", "60", "start"], ns=True)
        for db in databases:
            # over the Unix socket (trust): works inside or outside a namespace
            run([createdb, "-h", root, "-p", port, "-U", "postgres", db])
        pid = int((data / "postmaster.pid").read_text().split()[0])
        yield Postgres(host="127.0.0.1" if listen in ("*", "0.0.0.0") else listen, port=port, pid=pid, root=root, password=password)
    finally:
        if started:
            try:
                run([pg_ctl, "-D", data, "-m", "immediate", "-w", "-t", "30", "stop"], ns=True)
            except Exception:  # never leave a postmaster running on a deleted data folder
                with contextlib.suppress(Exception):
                    os.kill(int((data / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


# -- S3 (moto server mode) --------------------------------------------------------------
def have_moto() -> str | None:
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError:
        return "moto's S3 server is not installed: pip install 'moto[server]' boto3"
    return None


@dataclass
class S3:
    url: str
    bucket: str
    env: dict[str, str] = field(default_factory=dict)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@contextlib.contextmanager
def s3_endpoint(bucket: str = "mlflow-artifacts", root: Path | None = None) -> Iterator[S3]:
    """moto's S3 HTTP server on a free loopback port with ``bucket`` created."""
    why = have_moto()
    if why:
        raise RuntimeError(why)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    own = None if root else tempfile.mkdtemp(prefix="mlproject-s3-")
    log_path = Path(root or own) / "moto.log"
    log = open(log_path, "ab")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": url}
    s3 = S3(url=url, bucket=bucket, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                s3.client().create_bucket(Bucket=bucket)
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not come up:\n{log_path.read_text()[-3000:]}") from None
                time.sleep(0.3)
        yield s3
    finally:
        stop_group(proc)
        log.close()
        if own:
            shutil.rmtree(own, ignore_errors=True)


def stop_group(proc: subprocess.Popen, term_wait: float = 10) -> None:
    """SIGTERM, then SIGKILL, the process group ``proc`` leads (started with start_new_session)."""
    for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue


# -- hosts: network namespaces -----------------------------------------------------------
def have_netns() -> str | None:
    if not shutil.which("ip"):
        return "iproute2 (ip) not found: apt-get install iproute2"
    probe = f"mlp-probe-{os.getpid()}"
    out = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if out.returncode:
        return f"cannot create network namespaces here: {out.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Hosts:
    """Network namespaces standing for hosts, star-joined to ``hub`` by veth pairs."""

    def __init__(self, names: Sequence[str], hub: str, tag: str | None = None, observer: bool = False):
        self.tag = tag or secrets.token_hex(2)  # (names of this set only: close() deletes what they match)
        self.names, self.hub = list(names), hub
        self.ns = {n: f"mlp{self.tag}-{n}" for n in self.names}
        self._addr: dict[str, str] = {}
        self._hub_addr: dict[str, str] = {}  # the hub's address as each host sees it
        self._dev: dict[str, str] = {}       # the hub's end of each host's link
        # observer: one more link, from this process's own namespace to the hub (the test looks
        # at the hub's servers from outside, as an admin's laptop would)
        self.observer = observer
        self._obs_dev = f"mlp{self.tag}o0"

    def _ip(self, *args: str, ns: str | None = None) -> None:
        cmd = ["ip", *(["-n", ns] if ns else []), *args]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")

    def __enter__(self) -> Hosts:
        try:
            for name in self.names:
                self._ip("netns", "add", self.ns[name])
                self._ip("link", "set", "lo", "up", ns=self.ns[name])
            for i, name in enumerate(n for n in self.names if n != self.hub):
                a, b = f"mlp{self.tag}h{i}", f"mlp{self.tag}c{i}"  # (<= 15 characters)
                self._ip("link", "add", a, "type", "veth", "peer", "name", b)
                self._ip("link", "set", a, "netns", self.ns[self.hub])
                self._ip("link", "set", b, "netns", self.ns[name])
                hub_ip, host_ip = f"10.77.{i + 1}.1", f"10.77.{i + 1}.2"
                self._ip("addr", "add", f"{hub_ip}/30", "dev", a, ns=self.ns[self.hub])
                self._ip("addr", "add", f"{host_ip}/30", "dev", b, ns=self.ns[name])
                self._ip("link", "set", a, "up", ns=self.ns[self.hub])
                self._ip("link", "set", b, "up", ns=self.ns[name])
                self._addr[name], self._hub_addr[name], self._dev[name] = host_ip, hub_ip, a
            if self.observer:
                a, b = self._obs_dev, f"mlp{self.tag}o1"
                self._ip("link", "add", a, "type", "veth", "peer", "name", b)
                self._ip("link", "set", b, "netns", self.ns[self.hub])
                self._ip("addr", "add", "10.77.250.1/30", "dev", a)
                self._ip("addr", "add", "10.77.250.2/30", "dev", b, ns=self.ns[self.hub])
                self._ip("link", "set", a, "up")
                self._ip("link", "set", b, "up", ns=self.ns[self.hub])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for name in self.names:
            # kill whatever still runs in the namespace, then delete it (its veth ends go with it)
            pids = subprocess.run(["ip", "netns", "pids", self.ns[name]], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", self.ns[name]], capture_output=True)
        if self.observer:  # (gone with the hub's namespace already, unless that failed)
            subprocess.run(["ip", "link", "del", self._obs_dev], capture_output=True)

    def address(self, name: str, seen_from: str | None = None) -> str:
        """``name``'s address; the hub's as ``seen_from`` reaches it (each link has its own;
        ``seen_from=None``: from this process, through the observer link)."""
        if name == self.hub:
            if seen_from is None:
                if not self.observer:
                    raise ValueError("Hosts(observer=True) to reach the hub from this process")
                return "10.77.250.2"
            return self._hub_addr[seen_from]
        return self._addr[name]

    def pids(self, name: str) -> set[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns[name]], capture_output=True, text=True).stdout
        return {int(p) for p in out.split()}

    def prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[name]]

    def popen(self, name: str, cmd: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen([*self.prefix(name), *cmd], start_new_session=True, **kwargs)

    def run(self, name: str, cmd: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix(name), *cmd], **kwargs)

    def link(self, name: str, up: bool) -> None:
        """Take ``name``'s link down or bring it back. The hub's end goes down, so the host's end
        loses its carrier but keeps its address and routes: its packets are dropped and its TCP
        connections stall (nothing is reset, no error comes back), as when a cable is pulled."""
        self._ip("link", "set", self._dev[name], "up" if up else "down", ns=self.ns[self.hub])

    def kill_all(self, name: str) -> int:
        """SIGKILL every process on host ``name`` (a lost machine); how many there were."""
        pids = self.pids(name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)
