"""Redis Sentinel next to a LocalStack's redis-server: one replica and three Sentinels on
loopback, for failover tests.

    with LocalStack(workdir) as stack, SentinelGroup(stack) as ha:
        stack.start_worker("worker", env=ha.env)
        client = Client(ha.settings)
        ha.kill_primary(); ha.wait_promoted(); ha.rejoin_old_primary()
"""

from __future__ import annotations

import signal
import time
from typing import Any

import redis

from devstack.stack import LocalStack, free_port, wait_until
from shared.settings import Settings

MASTER_NAME = "mymaster"


class SentinelGroup:
    def __init__(self, stack: LocalStack, *, sentinels: int = 3, down_after_ms: int = 2000) -> None:
        self.stack = stack
        self.down_after_ms = down_after_ms
        self.primary_port = stack.redis_port
        self.replica_port = free_port()
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        url = ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports) + "/0"
        # What a producer or worker configured through Sentinel gets.
        self.env = {"REFINERY_REDIS_URL": url, "REFINERY_REDIS_SENTINEL_MASTER": MASTER_NAME}
        self.settings: Settings = stack.settings.model_copy(
            update={"redis_url": url, "redis_sentinel_master": MASTER_NAME}
        )

    def __enter__(self) -> SentinelGroup:
        self.start_replica()
        for n, port in enumerate(self.sentinel_ports):
            self.start_sentinel(n, port)
        # A failover needs a quorum that knows the replica and each other (they meet
        # through hello messages on the primary, every 2 s).
        wait_until(self._ready, timeout_s=30, what="Sentinels that see the replica and each other")
        return self

    def __exit__(self, *exc: object) -> None:
        ours = [f"sentinel{n}" for n in range(len(self.sentinel_ports))] + ["redis-replica"]
        # The stack's clients (workers) first: stopped after the Sentinels, each would
        # spend its whole retry budget looking for Redis on its way out.
        for name in [n for n in self.stack.processes if n not in {*ours, "redis", "s3"}]:
            self.stack.stop_process(name)
        for name in ours:
            self.stack.stop_process(name)

    def _start_replica(self, name: str, port: int, primary_port: int, *extra: str) -> None:
        # A directory of its own: a replica keeps the copy it synced as dump.rdb there.
        workdir = self.stack.workdir / name
        workdir.mkdir(exist_ok=True)
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(workdir), "--replicaof", "127.0.0.1", str(primary_port), *extra]
        process = self.stack.spawn(name, argv)
        replica = redis.Redis(port=port)
        wait_until(
            lambda: replica.info("replication")["master_link_status"] == "up",
            timeout_s=30,
            what=f"{name} in sync",
            process=process,
        )

    def start_replica(self) -> None:
        self._start_replica("redis-replica", self.replica_port, self.primary_port)

    def start_sentinel(self, n: int, port: int) -> None:
        # Each Sentinel rewrites its own file as the topology changes.
        conf = self.stack.workdir / f"sentinel{n}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.stack.workdir}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.primary_port} {len(self.sentinel_ports) // 2 + 1}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}\n"
            f"sentinel failover-timeout {MASTER_NAME} {4 * self.down_after_ms}\n"
        )
        process = self.stack.spawn(f"sentinel{n}", ["redis-server", str(conf), "--sentinel"])
        wait_until(redis.Redis(port=port).ping, timeout_s=10, what=f"sentinel {n}", process=process)

    def _ready(self) -> bool:
        for port in self.sentinel_ports:
            state: Any = redis.Redis(port=port).sentinel_master(MASTER_NAME)
            if state["num-slaves"] < 1 or state["num-other-sentinels"] < len(self.sentinel_ports) - 1:
                return False
        return True

    def primary(self) -> int:
        """The port the Sentinels name as primary now."""
        address: Any = redis.Redis(port=self.sentinel_ports[0]).sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(address[1])

    def kill_primary(self) -> float:
        """SIGKILL the primary; returns when (time.monotonic())."""
        self.stack.stop_process("redis", signal.SIGKILL)
        return time.monotonic()

    def wait_promoted(self, timeout_s: float = 30) -> None:
        wait_until(lambda: self.primary() == self.replica_port, timeout_s=timeout_s, what="replica promoted")

    def rejoin_old_primary(self) -> None:
        """Start the killed node again as the new primary's replica, so that submits find a
        replica to confirm them. Never promoted itself (priority 0): it has no persistence
        here, and a node promoted before its first sync would hand every replica an empty
        data set (docs/deploy.md)."""
        self._start_replica("redis", self.primary_port, self.primary(), "--replica-priority", "0")
