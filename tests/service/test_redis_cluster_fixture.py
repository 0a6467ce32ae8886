"""The real Redis servers of tests/redis_cluster.py: a 3 + 3 cluster whose killed master's
replica takes over with the writes it acknowledged, a master whose WAIT times out while its
replica is paused, and no server left behind, even by a start that fails half way."""

import socket

import pytest

from tests import redis_cluster as servers
from tests.redis_cluster import (
    BUS_PORT_OFFSET,
    LocalRedis,
    LocalRedisCluster,
    LocalRedisWithReplica,
    free_port,
    redis_unavailable_reason,
)

pytestmark = pytest.mark.skipif(redis_unavailable_reason() is not None,
                                reason=str(redis_unavailable_reason()))


def test_a_killed_master_fails_over_to_its_replica_with_the_acknowledged_writes(
        record_property):
    with LocalRedisCluster() as cluster:
        masters = {port for port, _ in cluster.masters()}
        replicas = {port for port, _ in cluster.replicas()}
        assert len(masters) == 3 and len(replicas) == 3 and set(cluster.ports) == masters | replicas
        rc = cluster.client(decode_responses=True)
        keys = [f"fixture-test:{i}" for i in range(300)]
        for key in keys:
            rc.set(key, key)
        owner = {key: cluster.master_of_slot(cluster.slot_of(key)) for key in keys}
        assert set(owner.values()) == masters  # the keys landed on all three masters
        assert cluster.wait_replicated(timeout_ms=5000) == {port: 1 for port in masters}

        victim = owner[keys[0]]
        (its_replica,) = cluster.replicas_of(victim)
        cluster.kill(victim)
        seconds = cluster.wait_for_failover(victim, timeout=30)
        record_property("failover_seconds", round(seconds, 2))
        print(f"failover after SIGKILL of a master: {seconds:.2f} s "
              f"(cluster-node-timeout {cluster.node_timeout_ms} ms)")
        assert seconds < 15
        assert its_replica in {port for port, _ in cluster.masters()}
        assert cluster.master_of_slot(cluster.slot_of(keys[0])) == its_replica
        moved = [key for key in keys if owner[key] == victim]
        assert moved and all(rc.get(key) == key for key in moved)  # the old client follows
        assert cluster.client(decode_responses=True).get(keys[0]) == keys[0]

        cluster.heal()  # the old master comes back as a replica of the one that took over
        assert cluster.replicas_of(its_replica) == [victim]
        assert len(cluster.masters()) == 3 and len(cluster.replicas()) == 3
        assert all(rc.get(key) == key for key in keys)


def test_wait_counts_the_replica_and_times_out_while_it_is_paused():
    with LocalRedisWithReplica() as pair:
        master = pair.client()
        master.set("k", "1")
        assert master.wait(1, 5000) == 1
        assert pair.replica_client().get("k") == b"1"
        with pair.replica_paused():
            master.set("k", "2")
            assert master.wait(1, 300) == 0
        assert master.wait(1, 5000) == 1
        assert pair.replica_client().get("k") == b"2"


def test_servers_are_gone_on_exit_even_when_the_start_fails_half_way(monkeypatch):
    port = free_port(cluster_bus=True)
    assert port + BUS_PORT_OFFSET <= 65535 and free_port(cluster_bus=True) != port

    with socket.socket() as taken:  # a port lost to another process: the next one is used
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1], free_port()])
        monkeypatch.setattr(servers, "free_port", lambda **_: next(ports))
        with LocalRedis() as server:
            process, folder = server.process, server.server.dir
            assert server.port != taken.getsockname()[1]
            assert server.client().ping() and folder.is_dir()
        assert process.poll() is not None and not folder.exists()
        monkeypatch.undo()

    seen = {}

    def not_healthy(self, timeout=30.0):
        seen["processes"] = [self.process(port) for port in self.ports]
        seen["folders"] = [self._nodes[port].dir for port in self.ports]
        raise TimeoutError("made to fail")

    monkeypatch.setattr(LocalRedisCluster, "wait_healthy", not_healthy)
    with pytest.raises(TimeoutError, match="made to fail"), LocalRedisCluster():
        pass
    assert len(seen["processes"]) == 6
    assert all(p.poll() is not None for p in seen["processes"])
    assert not any(folder.exists() for folder in seen["folders"])
