"""Real Redis servers on free loopback ports, for tests and benchmarks.

- ``LocalRedis``: one throwaway standalone server.
- ``LocalRedisWithReplica``: a standalone master and one replica (``--replicaof``), to test WAIT;
  the replica can be paused (SIGSTOP) so that WAIT times out.
- ``LocalRedisCluster``: a Redis Cluster of masters and replicas (3 + 3 by default) made with
  ``redis-cli --cluster create``, whose nodes can be killed (SIGKILL) to watch a replica take
  over, and restarted.

Each is a context manager: on exit, and when starting fails half way, every redis-server it
started is killed and its temporary folder removed. Servers keep nothing (``--save ""``,
``--appendonly no``) and listen on 127.0.0.1 only. On Linux a server also dies with the thread
that started it (PR_SET_PDEATHSIG), so a test run that is killed leaves no redis-server behind.

Plain Python (benchmark scripts import it without pytest). Loaded as a pytest plugin
(``pytest_plugins = ["tests.redis_cluster"]`` in tests/conftest.py) it also provides the
fixtures ``redis_cluster`` (session, 3 + 3), ``redis_with_replica`` (session) and
``local_redis`` (one test); they skip, saying why, where redis-server or redis-cli is missing.

    with LocalRedisCluster() as cluster:
        rc = cluster.client()
        rc.set("k", "v")
        cluster.wait_replicated()                 # WAIT on every master
        victim = cluster.master_of_slot(cluster.slot_of("k"))
        cluster.kill(victim)
        seconds = cluster.wait_for_failover(victim)
        cluster.heal()                            # restart it: it comes back as a replica
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.cluster import RedisCluster as RedisClusterClient
from redis.crc import key_slot
from redis.retry import Retry

HOST = "127.0.0.1"
BUS_PORT_OFFSET = 10000  # a cluster node's bus listens on its port + 10000
CLUSTER_SLOTS = 16384
MIN_REDIS_VERSION = (6, 0)
DEFAULT_NODE_TIMEOUT_MS = 1000
_FORMING_TIMEOUT_MS = 5000

__all__ = [
    "LocalRedis",
    "LocalRedisCluster",
    "LocalRedisWithReplica",
    "RedisStartError",
    "RedisUnavailable",
    "free_port",
    "redis_unavailable_reason",
]


class RedisUnavailable(RuntimeError):
    """redis-server or redis-cli is missing (or too old) on this machine."""


class RedisStartError(RuntimeError):
    """A server or the cluster did not come up; the message holds the servers' log tails."""


# -- what this machine has ----------------------------------------------------------------------

@functools.cache
def redis_unavailable_reason() -> str | None:
    """Why real Redis servers cannot be started here (None: they can). For ``pytest.skip``."""
    missing = [name for name in ("redis-server", "redis-cli") if shutil.which(name) is None]
    if missing:
        return (f"{' and '.join(missing)} not on PATH: the Redis cluster and replica tests "
                "start their own servers (Debian: apt-get install redis-server redis-tools; "
                ".ci/run installs them)")
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"redis-server --version failed: {exc}"
    match = re.search(r"v=(\d+)\.(\d+)", out)
    if not match:
        return f"cannot read the version of redis-server from {out.strip()!r}"
    version = (int(match.group(1)), int(match.group(2)))
    if version < MIN_REDIS_VERSION:
        return (f"redis-server {version[0]}.{version[1]} is too old for these tests "
                f"(needs {MIN_REDIS_VERSION[0]}.{MIN_REDIS_VERSION[1]} or newer)")
    return None


def _require_redis() -> None:
    reason = redis_unavailable_reason()
    if reason:
        raise RedisUnavailable(reason)


# -- ports --------------------------------------------------------------------------------------

_reserved_ports: set[int] = set()
_ports_lock = threading.Lock()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, cluster_bus: bool = False, attempts: int = 200) -> int:
    """A loopback port that nothing listens on, picked by binding port 0.

    With ``cluster_bus`` its bus port (port + 10000) is free too. A port handed out is
    reserved in this process (with its bus port) until released, so that two servers of this
    process never get the same one; another process can still take it before the server binds
    it, which the servers' start handles by starting again on another port.
    """
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        wanted = [port, port + BUS_PORT_OFFSET] if cluster_bus else [port]
        with _ports_lock:
            if wanted[-1] > 65535 or any(p in _reserved_ports for p in wanted):
                continue
            if cluster_bus and not _bindable(port + BUS_PORT_OFFSET):
                continue
            _reserved_ports.update(wanted)
        return port
    raise RuntimeError(f"no free loopback port found in {attempts} attempts")


def _release_port(port: int) -> None:
    with _ports_lock:
        _reserved_ports.discard(port)
        _reserved_ports.discard(port + BUS_PORT_OFFSET)


# -- one redis-server ---------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
# Looked up here, not in the child (a symbol lookup after fork may wait on a lock forever).
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _admin(port: int, timeout: float = 2.0) -> redis.Redis:
    """A short-lived connection to one server, for the checks (strings, small timeouts, no
    retries: a check that fails is tried again by its caller's loop)."""
    return redis.Redis(host=HOST, port=port, socket_timeout=timeout,
                       socket_connect_timeout=timeout, decode_responses=True,
                       single_connection_client=True, retry=Retry(NoBackoff(), 0))


def _parse_info(reply) -> dict:
    """CLUSTER INFO as a dict (redis-py parses it already; a raw reply is parsed here)."""
    if isinstance(reply, dict):
        return reply
    return dict(line.split(":", 1) for line in reply.splitlines() if ":" in line)


class _Server:
    """One redis-server process in its own folder, its output in ``redis.log`` there."""

    def __init__(self, workdir: Path, args: Sequence[str] = (), *, cluster: bool = False):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.cluster = cluster
        self.port: int | None = None
        self.process: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return "\n".join(f"    {line}" for line in text)

    def _command(self, port: int) -> list[str]:
        return ["redis-server", "--port", str(port), "--bind", HOST, "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", str(self.dir),
                "--logfile", "", *self.args]

    def start(self, port: int | None = None, timeout: float = 10.0, attempts: int = 5) -> int:
        """Start on ``port`` (default: a free one; on a lost race for it, another one)."""
        fixed = port is not None
        for _ in range(1 if fixed else attempts):
            if not fixed:
                port = free_port(cluster_bus=self.cluster)
            with self.log.open("ab") as log:
                # The death signal follows the thread that forks: only from the main thread,
                # which lives as long as the process (others rely on close() and atexit).
                main = threading.current_thread() is threading.main_thread()
                self.process = subprocess.Popen(
                    self._command(port), cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent if _prctl is not None and main else None)
            self.port = port
            if self._wait_ping(timeout):
                return port
            if self.alive:  # up but not answering: give up on it
                self.kill()
                raise RedisStartError(f"redis-server on port {port} did not answer PING in "
                                      f"{timeout:.0f} s; its log:\n{self.log_tail()}")
            lost_race = "already in use" in self.log.read_text(errors="replace")
            if not fixed:
                _release_port(port)
                self.port = None
            if not lost_race or fixed:
                break
        raise RedisStartError(f"redis-server on port {port} exited with status "
                              f"{self.process.returncode}; its log:\n{self.log_tail()}")

    def _wait_ping(self, timeout: float) -> bool:
        """Wait until this process answers on its port (not another one that took the port:
        the answer's process_id is checked)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive:
            try:
                with _admin(self.port, timeout=0.5) as conn:
                    if int(conn.info("server")["process_id"]) == self.process.pid:
                        return True
            except redis.RedisError:
                pass
            time.sleep(0.02)
        return False

    def kill(self) -> None:
        """SIGKILL (after SIGCONT, should it be paused) and reap it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
                self.process.kill()
        self.process.wait()


# -- what the three kinds have in common ---------------------------------------------------------

_open_instances: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # whatever a script forgot to close
    for instance in list(_open_instances):
        instance.close()


class _Servers:
    """A temporary folder of redis-servers; killed and removed on close (idempotent)."""

    _prefix = "dsmi-redis-"

    def __init__(self, *, start_timeout: float, keep_dir: bool):
        self.start_timeout = start_timeout
        self.keep_dir = keep_dir
        self._root: Path | None = None
        self._servers: list[_Server] = []
        self._clients: list = []

    def __enter__(self):
        _require_redis()
        self._root = Path(tempfile.mkdtemp(prefix=self._prefix))
        _open_instances.add(self)
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        raise NotImplementedError

    def _new_server(self, name: str, args: Sequence[str] = (), *, cluster: bool = False
                    ) -> _Server:
        server = _Server(self._root / name, args, cluster=cluster)
        self._servers.append(server)
        return server

    def _track(self, client):
        self._clients.append(client)
        return client

    def _logs(self) -> str:
        return "\n".join(f"  port {s.port} ({s.dir.name}):\n{s.log_tail()}"
                         for s in self._servers)

    def close(self) -> None:
        """Kill every server, close the clients made by ``client()``, remove the folder."""
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        for server in self._servers:
            server.kill()
        for server in self._servers:
            if server.port is not None:
                _release_port(server.port)
        self._servers.clear()
        if self._root is not None and not self.keep_dir:
            shutil.rmtree(self._root, ignore_errors=True)
        _open_instances.discard(self)


# -- a standalone server --------------------------------------------------------------------------

class LocalRedis(_Servers):
    """One throwaway standalone redis-server on a free loopback port.

    ``args``: more redis-server options (``["--maxmemory", "100mb"]``); ``keep_dir``: leave
    the temporary folder (its ``redis.log``) after exit.
    """

    def __init__(self, args: Sequence[str] = (), *, start_timeout: float = 10.0,
                 keep_dir: bool = False):
        super().__init__(start_timeout=start_timeout, keep_dir=keep_dir)
        self.args = list(args)
        self.server: _Server | None = None

    def _start(self) -> None:
        self.server = self._new_server("redis", self.args)
        self.server.start(timeout=self.start_timeout)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def process(self) -> subprocess.Popen:
        return self.server.process

    def client(self, **kwargs) -> redis.Redis:
        """A redis-py client of the server (closed on exit); ``kwargs`` go to ``redis.Redis``."""
        return self._track(redis.Redis(host=HOST, port=self.port, **kwargs))


# -- a master and its replica ---------------------------------------------------------------------

class LocalRedisWithReplica(_Servers):
    """A standalone master and one replica of it (``--replicaof``), in sync on entry.

    ``WAIT 1 <ms>`` on the master answers 1 while the replica runs and 0 (after the timeout)
    while it is paused: ``pause_replica()`` / ``resume_replica()`` (SIGSTOP / SIGCONT), or
    ``with pair.replica_paused(): ...``.
    """

    _prefix = "dsmi-redis-replicated-"

    def __init__(self, args: Sequence[str] = (), *, start_timeout: float = 20.0,
                 keep_dir: bool = False):
        super().__init__(start_timeout=start_timeout, keep_dir=keep_dir)
        self.args = ["--repl-diskless-sync-delay", "0", *args]
        self.master: _Server | None = None
        self.replica: _Server | None = None
        self._paused = False

    def _start(self) -> None:
        self.master = self._new_server("master", self.args)
        self.master.start(timeout=self.start_timeout)
        self.replica = self._new_server(
            "replica", [*self.args, "--replicaof", HOST, str(self.master.port)])
        self.replica.start(timeout=self.start_timeout)
        self.wait_in_sync(self.start_timeout)

    def wait_in_sync(self, timeout: float = 20.0) -> float:
        """Wait until the replica has synced and the master counts it online; the seconds."""
        start = time.monotonic()
        deadline = start + timeout
        problem = ""
        while time.monotonic() < deadline:
            try:
                with _admin(self.replica.port) as r, _admin(self.master.port) as m:
                    replica = r.info("replication")
                    master = m.info("replication")
                up = (replica.get("master_link_status") == "up"
                      and not replica.get("master_sync_in_progress"))
                online = str(master.get("slave0", {}).get("state", "")) == "online"
                if up and online:
                    # The first WAIT after a sync waited up to a second for the replica's
                    # next ack: only in sync once a write is acknowledged.
                    with _admin(self.master.port, timeout=timeout) as m:
                        m.set("dsmi-sync-marker", "1")
                        acked = m.wait(1, int(max(deadline - time.monotonic(), 0.1) * 1000))
                        m.delete("dsmi-sync-marker")
                    if acked >= 1:
                        return time.monotonic() - start
                    problem = "the replica acknowledged no write"
                    continue
                problem = f"replica link {replica.get('master_link_status')}, " \
                          f"master sees {master.get('slave0')}"
            except redis.RedisError as exc:
                problem = str(exc)
            time.sleep(0.05)
        raise RedisStartError(f"the replica did not sync in {timeout:.0f} s ({problem}); "
                              f"logs:\n{self._logs()}")

    @property
    def port(self) -> int:
        return self.master.port

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.master.port}/0"

    @property
    def replica_port(self) -> int:
        return self.replica.port

    @property
    def replica_url(self) -> str:
        return f"redis://{HOST}:{self.replica.port}/0"

    def pause_replica(self) -> None:
        """SIGSTOP the replica: it takes no more writes and acknowledges nothing."""
        os.kill(self.replica.process.pid, signal.SIGSTOP)
        self._paused = True

    def resume_replica(self) -> None:
        os.kill(self.replica.process.pid, signal.SIGCONT)
        self._paused = False

    @contextlib.contextmanager
    def replica_paused(self) -> Iterator[None]:
        self.pause_replica()
        try:
            yield
        finally:
            self.resume_replica()

    def client(self, **kwargs) -> redis.Redis:
        """A redis-py client of the master (closed on exit)."""
        return self._track(redis.Redis(host=HOST, port=self.master.port, **kwargs))

    def replica_client(self, **kwargs) -> redis.Redis:
        """A redis-py client of the replica (closed on exit)."""
        return self._track(redis.Redis(host=HOST, port=self.replica.port, **kwargs))


# -- a cluster ------------------------------------------------------------------------------------

def _slot_key(slot_ranges: Sequence[tuple[int, int]]) -> str:
    """A key whose slot lies in one of ``slot_ranges``."""
    for n in range(1_000_000):
        key = f"dsmi-redis-cluster-wait:{n}"
        slot = key_slot(key.encode())
        if any(lo <= slot <= hi for lo, hi in slot_ranges):
            return key
    raise ValueError(f"no key found for the slots {slot_ranges}")


class LocalRedisCluster(_Servers):
    """A Redis Cluster of ``masters`` masters with ``replicas_per_master`` replicas each, on
    free loopback ports, healthy on entry (every node: cluster_state:ok, all 16384 slots
    covered, one view of who owns which slot; every replica synced).

    Failover is made quick and deterministic: ``node_timeout_ms`` (default 1000) is how long a
    node may be silent before it is suspected; ``cluster-replica-validity-factor 0`` lets a
    replica take over however long its master's link has been down, and
    ``cluster-replica-no-failover no`` (the default, said explicitly) lets it try at all. A
    replica of a SIGKILLed master then takes over after the node timeout, the FAIL report's
    gossip and the election's random 0.5 to 1 s delay: 2 to 3 s in all with the default.
    ``cluster-require-full-coverage yes``: until then the other nodes refuse queries.

    ``args``: more redis-server options for every node; ``keep_dir``: leave the temporary
    folder (each node's ``redis.log`` and ``nodes.conf``) after exit.
    """

    _prefix = "dsmi-redis-cluster-"

    def __init__(self, masters: int = 3, replicas_per_master: int = 1, *,
                 node_timeout_ms: int = DEFAULT_NODE_TIMEOUT_MS, args: Sequence[str] = (),
                 start_timeout: float = 60.0, keep_dir: bool = False):
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        if replicas_per_master < 0:
            raise ValueError("replicas_per_master must be 0 or more")
        super().__init__(start_timeout=start_timeout, keep_dir=keep_dir)
        self.n_masters = masters
        self.replicas_per_master = replicas_per_master
        self.node_timeout_ms = node_timeout_ms
        self.args = list(args)
        self._nodes: dict[int, _Server] = {}  # port -> server, in start order
        self._killed: dict[int, tuple[float, list[int]]] = {}  # port -> (when, its replicas)

    # -- start ------------------------------------------------------------------------------

    def _node_args(self, workdir: Path) -> list[str]:
        # Nodes start with a node timeout of at least 5 s, set to node_timeout_ms once the
        # cluster is formed (and after each restart): a handshake not answered within the
        # node timeout is dropped, and on a loaded machine 1 s handshakes were, leaving
        # `redis-cli --cluster create` waiting for the join forever.
        return ["--cluster-enabled", "yes",
                "--cluster-config-file", str(workdir / "nodes.conf"),
                "--cluster-node-timeout", str(max(self.node_timeout_ms, _FORMING_TIMEOUT_MS)),
                "--cluster-replica-validity-factor", "0",
                "--cluster-replica-no-failover", "no",
                "--cluster-require-full-coverage", "yes",
                "--repl-diskless-sync-delay", "0",
                *self.args]

    def _start(self) -> None:
        for i in range(self.n_masters * (1 + self.replicas_per_master)):
            name = f"node-{i + 1}"
            server = self._new_server(name, self._node_args(self._root / name), cluster=True)
            server.start(timeout=self.start_timeout)
            self._nodes[server.port] = server
        command = ["redis-cli", "--cluster", "create",
                   *(f"{HOST}:{port}" for port in self._nodes),
                   "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
        try:
            created = subprocess.run(command, capture_output=True, text=True,
                                     stdin=subprocess.DEVNULL, timeout=self.start_timeout)
        except subprocess.TimeoutExpired as exc:
            raise RedisStartError(f"redis-cli --cluster create took over "
                                  f"{self.start_timeout:.0f} s; logs:\n{self._logs()}") from exc
        if created.returncode != 0:
            raise RedisStartError(f"redis-cli --cluster create failed ({created.returncode}):\n"
                                  f"{created.stdout}{created.stderr}\nlogs:\n{self._logs()}")
        self.wait_healthy(self.start_timeout)
        for port in self._nodes:
            self._set_node_timeout(port)
        self._wait_acknowledging(self.start_timeout)

    def _wait_acknowledging(self, timeout: float) -> None:
        """Until every master's replicas acknowledge a write: the first WAIT after a sync
        waited up to a second for the replica's next ack, which a write's own WAIT of a
        fraction of that would take for a lost replica."""
        deadline = time.monotonic() + timeout
        while True:
            acks = self.wait_replicated(timeout_ms=2000)
            if all(n >= self.replicas_per_master for n in acks.values()):
                return
            if time.monotonic() > deadline:
                raise RedisStartError(f"replicas do not acknowledge writes: {acks}")

    def _set_node_timeout(self, port: int) -> None:
        with _admin(port) as conn:
            conn.config_set("cluster-node-timeout", self.node_timeout_ms)

    # -- what is running ----------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        """Every node's port, in start order (killed ones too)."""
        return list(self._nodes)

    @property
    def live_ports(self) -> list[int]:
        return [port for port, server in self._nodes.items() if server.alive]

    @property
    def seed_url(self) -> str:
        """The URL of a running node (the first one started, while it runs)."""
        live = self.live_ports
        if not live:
            raise RuntimeError("no node of the cluster is running")
        return f"redis://{HOST}:{live[0]}"

    def process(self, port: int) -> subprocess.Popen:
        return self._nodes[port].process

    def _roles(self) -> dict[int, list]:
        roles = {}
        for port in self.live_ports:
            with _admin(port) as conn:
                roles[port] = conn.execute_command("ROLE")
        return roles

    def masters(self) -> list[tuple[int, subprocess.Popen]]:
        """(port, process) of every running node that says (ROLE) it is a master."""
        return [(port, self._nodes[port].process)
                for port, role in self._roles().items() if role[0] == "master"]

    def replicas(self) -> list[tuple[int, subprocess.Popen]]:
        """(port, process) of every running node that says (ROLE) it is a replica."""
        return [(port, self._nodes[port].process)
                for port, role in self._roles().items() if role[0] == "slave"]

    def replicas_of(self, master_port: int) -> list[int]:
        """The ports of the running replicas that say they replicate ``master_port``."""
        return [port for port, role in self._roles().items()
                if role[0] == "slave" and int(role[2]) == master_port]

    @staticmethod
    def _slot_map(conn: redis.Redis) -> tuple[tuple[int, int, int], ...]:
        """(first slot, last slot, master's port) of every range, as one node sees them."""
        ranges = conn.execute_command("CLUSTER SLOTS")
        return tuple(sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in ranges))

    def slot_map(self, port: int | None = None) -> tuple[tuple[int, int, int], ...]:
        """(first slot, last slot, master port) ranges as node ``port`` (default: a live
        node) sees them."""
        with _admin(port or self.live_ports[0]) as conn:
            return self._slot_map(conn)

    @staticmethod
    def slot_of(key: str | bytes) -> int:
        return key_slot(key.encode() if isinstance(key, str) else key)

    def master_of_slot(self, slot: int) -> int:
        """The port of the master that serves ``slot`` (as a live node sees it)."""
        for lo, hi, port in self.slot_map():
            if lo <= slot <= hi:
                return port
        raise LookupError(f"no master serves slot {slot}")

    # -- health -------------------------------------------------------------------------------

    def _problem(self, *, check_replicas: bool = True) -> str | None:
        """What keeps the cluster from being healthy (None: nothing)."""
        live = self.live_ports
        if not live:
            return "no node is running"
        views, roles = {}, {}
        try:
            for port in live:
                with _admin(port) as conn:
                    info = _parse_info(conn.execute_command("CLUSTER INFO"))
                    if info.get("cluster_state") != "ok":
                        return f"{port}: cluster_state {info.get('cluster_state')}"
                    if int(info.get("cluster_slots_ok", 0)) != CLUSTER_SLOTS:
                        return f"{port}: {info.get('cluster_slots_ok')} slots ok"
                    if int(info.get("cluster_known_nodes", 0)) != len(self._nodes):
                        return f"{port}: knows {info.get('cluster_known_nodes')} nodes"
                    views[port] = self._slot_map(conn)
                    roles[port] = conn.execute_command("ROLE")
        except redis.RedisError as exc:
            return f"{exc.__class__.__name__}: {exc}"
        if len(set(views.values())) > 1:
            return "the nodes disagree on the slot owners"
        owners = {port for _, _, port in next(iter(views.values()))}
        if not owners <= set(live):
            return f"slots served by stopped nodes {sorted(owners - set(live))}"
        if not all(roles[port][0] == "master" for port in owners):
            return "a slot owner does not say it is a master"
        if check_replicas:
            for port, role in roles.items():
                if role[0] == "slave" and (role[3] != "connected" or int(role[2]) not in owners):
                    return f"replica {port}: link to {role[2]} {role[3]}"
            if len(live) == len(self._nodes):
                n_replicas = sum(role[0] == "slave" for role in roles.values())
                if len(owners) != self.n_masters or n_replicas != len(live) - self.n_masters:
                    return f"{len(owners)} masters serve slots, {n_replicas} replicas"
        return None

    def wait_healthy(self, timeout: float = 30.0) -> float:
        """Wait until every running node says cluster_state:ok, all slots are covered by
        running masters and every node sees the same owners, and every replica is in sync
        (with every node running: ``masters`` masters, the others replicas). The seconds."""
        start = time.monotonic()
        deadline = start + timeout
        while (problem := self._problem()) is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster is not healthy after {timeout:.0f} s: "
                                   f"{problem}; logs:\n{self._logs()}")
            time.sleep(0.05)
        return time.monotonic() - start

    # -- failures -----------------------------------------------------------------------------

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port`` (noting, when it is a master, its replicas)."""
        server = self._nodes[port]
        if not server.alive:
            raise ValueError(f"the node on port {port} is not running")
        replicas = self.replicas_of(port)
        server.kill()
        self._killed[port] = (time.monotonic(), replicas)

    def wait_for_failover(self, killed_port: int, timeout: float = 30.0) -> float:
        """Seconds from ``kill(killed_port)`` until one of its replicas says it is a master
        and every running node says cluster_state:ok and sees the same owners, none of them
        stopped."""
        if killed_port not in self._killed:
            raise ValueError(f"kill({killed_port}) first")
        killed_at, replicas = self._killed[killed_port]
        if not replicas:
            raise ValueError(f"the node on port {killed_port} was no master with replicas")
        deadline = time.monotonic() + timeout
        while True:
            problem = self._problem(check_replicas=False)
            if problem is None:
                try:
                    roles = self._roles()
                except redis.RedisError as exc:
                    problem = str(exc)
                else:
                    if not any(roles.get(p, [""])[0] == "master" for p in replicas):
                        problem = f"no replica of {killed_port} ({replicas}) is master yet"
            if problem is None:
                return time.monotonic() - killed_at
            if time.monotonic() > deadline:
                raise TimeoutError(f"no failover of {killed_port} in {timeout:.0f} s: "
                                   f"{problem}; logs:\n{self._logs()}")
            time.sleep(0.02)

    def restart(self, port: int) -> None:
        """Start the killed node on ``port`` again, from its nodes.conf: it rejoins (a master
        that was failed over comes back as a replica of the node that took over)."""
        server = self._nodes[port]
        if server.alive:
            raise ValueError(f"the node on port {port} is running")
        server.start(port=port, timeout=self.start_timeout)
        self._set_node_timeout(port)
        self._killed.pop(port, None)

    def heal(self, timeout: float = 60.0) -> float:
        """Restart every killed node and wait until the cluster is healthy; the seconds."""
        start = time.monotonic()
        for port, server in self._nodes.items():
            if not server.alive:
                self.restart(port)
        self.wait_healthy(max(1.0, timeout - (time.monotonic() - start)))
        self._wait_acknowledging(max(1.0, timeout - (time.monotonic() - start)))
        return time.monotonic() - start

    # -- data ---------------------------------------------------------------------------------

    def wait_replicated(self, timeout_ms: int = 2000) -> dict[int, int]:
        """WAIT on every master for the replicas it has; {master port: replicas that
        acknowledged}. Every write a master took before this call is then on that many of
        its replicas (a marker key is set and deleted on each master: WAIT counts from the
        connection's own last write)."""
        acks = {}
        ranges: dict[int, list[tuple[int, int]]] = {}
        for lo, hi, port in self.slot_map():
            ranges.setdefault(port, []).append((lo, hi))
        roles = self._roles()
        for port, slots in ranges.items():
            key = _slot_key(slots)
            with _admin(port, timeout=timeout_ms / 1000 + 5) as conn:
                conn.set(key, "1")
                conn.delete(key)
                acks[port] = conn.execute_command("WAIT", len(roles[port][2]), timeout_ms)
        return acks

    def flushall(self) -> None:
        """FLUSHALL on every master (the replicas follow)."""
        for port, _ in self.masters():
            with _admin(port) as conn:
                conn.flushall()

    def client(self, **kwargs) -> RedisClusterClient:
        """A redis-py ``RedisCluster`` client that starts from every running node (closed on
        exit); ``kwargs`` go to ``redis.cluster.RedisCluster``."""
        nodes = [ClusterNode(HOST, port) for port in self.live_ports]
        return self._track(RedisClusterClient(startup_nodes=nodes, **kwargs))


# -- pytest fixtures, when loaded by pytest ------------------------------------------------------
# Only when pytest is already imported (as a plugin: pytest_plugins = ["tests.redis_cluster"]),
# so that benchmark scripts import this module without pytest.

if "pytest" in sys.modules:
    import pytest

    def _skip_without_redis() -> None:
        reason = redis_unavailable_reason()
        if reason:
            pytest.skip(reason)

    @pytest.fixture(scope="session")
    def redis_cluster() -> Iterator[LocalRedisCluster]:
        """A 3-master, 3-replica cluster shared by the session (keys stay between tests: use
        a prefix of your own, or ``flushall()``). A test that kills nodes calls ``heal()``
        when done, or starts a ``LocalRedisCluster`` of its own."""
        _skip_without_redis()
        with LocalRedisCluster() as cluster:
            yield cluster

    @pytest.fixture(scope="session")
    def redis_with_replica() -> Iterator[LocalRedisWithReplica]:
        """A standalone master and its replica, shared by the session (a test that pauses
        the replica resumes it: ``with pair.replica_paused(): ...``)."""
        _skip_without_redis()
        with LocalRedisWithReplica() as pair:
            yield pair

    @pytest.fixture
    def local_redis() -> Iterator[LocalRedis]:
        """A fresh, empty standalone server for one test."""
        _skip_without_redis()
        with LocalRedis() as server:
            yield server
