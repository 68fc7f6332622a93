"""Job kinds are declared once (shared/contract.py): the routes, queues, handlers and
stages read from the declarations agree with them, the wire names stay what foreign
producers send, and a fourth kind added in a few lines is served by a real worker."""

from __future__ import annotations

import io
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from devstack.stack import LocalStack, wait_until
from producer.client import Client
from shared.contract import KINDS, JobState
from shared.routing import default_queues, kinds_served, model_queues, task_routes
from shared.settings import Settings
from worker.handlers import handler_class

TESTS = Path(__file__).parent
# Timed by the lifecycle for every kind; the rest of timings_ms are the kind's own stages.
LIFECYCLE_TIMINGS = {"queue_wait", "batch_wait", "total"}


def test_the_wire_names_are_those_foreign_producers_send() -> None:
    settings = Settings(_env_file=None)
    routes = task_routes(settings)
    assert {name: (kind.task, routes[kind.task]["queue"]) for name, kind in KINDS.items()} == {
        "generate_and_refine": ("refinery.generate_and_refine", "generate"),
        "refine_only": ("refinery.refine_only", "refine"),
        "pair": ("refinery.pair", "pairs"),
    }
    assert routes["refinery.deliver_callback"] == {"queue": "callbacks"}
    assert default_queues(settings) == ["generate", "refine"]


def test_every_kind_has_a_handler_typed_by_its_spec_and_stages_of_its_own() -> None:
    for name, kind in KINDS.items():
        handler = handler_class(kind)
        (base,) = handler.__orig_bases__  # type: ignore[attr-defined]  # JobHandler[ItsSpec]
        assert typing.get_args(base) == (kind.spec,), name
        assert kind.stages and len(set(kind.stages)) == len(kind.stages), name
        assert not LIFECYCLE_TIMINGS & set(kind.stages), name


def test_queue_names_are_one_setting() -> None:
    settings = Settings(_env_file=None, queues={"pair": "pairs-eu"})
    assert settings.queue("pair") == "pairs-eu" and settings.queue("refine_only") == "refine"
    assert task_routes(settings)["refinery.pair"] == {"queue": "pairs-eu"}
    assert kinds_served(settings, ["pairs-eu", "generate"]) == ["generate_and_refine", "pair"]
    assert "pairs" not in model_queues(settings)
    with pytest.raises(ValidationError, match="unknown job kind"):
        Settings(_env_file=None, queues={"generate": "g"})  # the queue's name, not the kind's


@pytest.mark.integration
def test_jobs_time_exactly_their_declared_stages(client: Client) -> None:
    jobs = {
        "generate_and_refine": client.submit_generate("stages", seed=1, width=32, height=32),
        "refine_only": client.submit_refine(image=_png(32, 32, 90)),
    }
    for name, job in jobs.items():
        record = job.wait(timeout=120)
        assert record.state is JobState.succeeded, record.error
        assert set(record.timings_ms) - LIFECYCLE_TIMINGS == set(KINDS[name].stages), name


@pytest.fixture
def fill_kind() -> Iterator[None]:
    """Declares ``fill`` in this process, as the worker will in its own; undeclared after."""
    sys.path.insert(0, str(TESTS))
    import fill_kind  # noqa: F401  # declares the kind

    yield
    KINDS.pop("fill")
    sys.modules.pop("fill_kind")
    sys.path.remove(str(TESTS))


@pytest.mark.integration
def test_a_fourth_kind_declared_in_a_few_lines_is_served_by_a_real_worker(stack: LocalStack, fill_kind) -> None:
    from fill_kind import FillSpec

    # `refinery worker`, after importing the module that declares the kind.
    hostname = "fill@localstack"
    argv = [sys.executable, "-c", "import fill_kind, cli; cli.main()", "worker", "--queues=fill", f"--name={hostname}"]
    process = stack.spawn("fill", [*argv, "--no-callbacks"], {"PYTHONPATH": str(TESTS)})
    try:
        client = Client(stack.settings)
        wait_until(lambda: hostname in client.store.workers(), timeout_s=120, what="fill worker", process=process)
        record = client.submit(FillSpec(width=24, height=16, grey=200)).wait(timeout=60)
        assert record.state is JobState.succeeded, record.error
        assert record.kind == "fill" and record.worker == hostname
        assert set(record.timings_ms) - LIFECYCLE_TIMINGS == {"fill", "encode", "upload"}
        assert record.result is not None
        image = Image.open(io.BytesIO(client.storage.get(record.result.uri)))
        assert image.size == (24, 16) and image.getextrema() == ((200, 200),) * 3
    finally:
        stack.stop_process("fill")


def _png(width: int, height: int, grey: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (grey, grey, grey)).save(buffer, format="PNG")
    return buffer.getvalue()
