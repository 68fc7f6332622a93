"""A claim's lease against a real redis-server, when the reply to the claim is lost.

In a failover the primary can apply a claim's transaction and lose the connection before
its reply arrives. redis-py then reports a conflict on the watched record, so the claim
runs again and finds the job running under this very process's lease. The connection
class below loses exactly that one reply, after the server applied it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from devstack.stack import LocalStack
from shared.contract import GenerateSpec, JobRecord, JobState
from shared.records import RecordStore
from shared.settings import Settings
from worker.leases import LeaseKeeper
from worker.lifecycle import JobRunner

pytestmark = pytest.mark.integration


class LosesOneExecReply(redis.Connection):
    """Reads the reply to the next EXEC it sends (so the server applied it), then reports
    the connection lost instead of returning it."""

    armed = False

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        chunks = command if isinstance(command, list) else [command]
        self.sent_exec = b"EXEC" in b"".join(bytes(chunk) for chunk in chunks)
        super().send_packed_command(command, check_health)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        response = super().read_response(*args, **kwargs)
        if LosesOneExecReply.armed and self.sent_exec and isinstance(response, list):
            LosesOneExecReply.armed = False
            self.disconnect()
            raise redis.ConnectionError("the reply to EXEC was lost")
        return response


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = LocalStack(tmp_path_factory.mktemp("leases"))
    try:
        stack.start_redis()
        yield stack
    finally:
        stack.stop()


def _runner(server: LocalStack) -> tuple[JobRunner, RecordStore]:
    pool = redis.ConnectionPool(connection_class=LosesOneExecReply, port=server.redis_port)
    store = RecordStore(redis.Redis(connection_pool=pool), ttl_s=600)
    settings = Settings(_env_file=None, redis_url=f"redis://127.0.0.1:{server.redis_port}/0")
    leases = LeaseKeeper(store, settings.lease_s, "w")
    # Claiming needs only the settings, the records and the leases.
    runner = JobRunner(settings, None, None, None, leases, store, None, lambda *_: None, "w@host")  # type: ignore[arg-type]
    return runner, store


def _queued(store: RecordStore, job_id: str) -> None:
    spec = GenerateSpec(prompt="portrait", seed=1)
    store.create(JobRecord(job_id=job_id, kind=spec.kind, spec=spec, seed=1), None)


def test_a_claim_whose_reply_was_lost_still_runs_the_job_here(server):
    runner, store = _runner(server)
    _queued(store, "lost-reply")
    LosesOneExecReply.armed = True
    claim = runner._claim("lost-reply")
    assert not LosesOneExecReply.armed, "the reply was lost once"
    record = store.get("lost-reply")
    assert claim.claimed and record.state is JobState.running and record.lease_owner == runner.leases.owner
    assert record.attempts == 1, "one attempt, though the claim ran twice"
    assert runner.leases.held() == ["lost-reply"], "its lease is renewed while it runs"
    runner.leases.release("lost-reply")  # nothing runs it here: its renewals would outlive the server


def test_a_job_held_by_another_worker_leaves_no_lease_renewed_here(server):
    runner, store = _runner(server)
    other, _ = _runner(server)
    _queued(store, "elsewhere")
    assert other._claim("elsewhere").claimed
    claim = runner._claim("elsewhere")
    assert not claim.claimed and claim.retry_in is not None and claim.retry_in > 0
    assert runner.leases.held() == [], "a lease this worker does not hold is not renewed by it"
    assert store.get("elsewhere").lease_owner == other.leases.owner
    other.leases.release("elsewhere")  # nothing runs it here: its renewals would outlive the server
