"""What a worker agrees to run: sizes its loaded preset supports, and model queues only
where the models are loaded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from devstack.stack import LocalStack
from shared.contract import GenerateSpec, JobRecord, PairSpec
from shared.errors import InvalidInput
from shared.objects import ObjectStore
from shared.settings import Settings
from worker.handlers.generate import GenerateJob
from worker.handlers.pair import PairJob
from worker.registry import ModelRegistry
from worker.timing import StageTimer


@pytest.fixture
def flux_registry(tmp_path) -> ModelRegistry:
    # Nothing is loaded until a pipeline is used: the preset alone decides what is accepted.
    settings = Settings(_env_file=None, model_preset="flux-schnell", model_cache_dir=tmp_path)
    return ModelRegistry(settings)


def test_a_flux_worker_refuses_a_tiny_generate_job(flux_registry):
    job = GenerateJob(flux_registry, ObjectStore(flux_registry.settings), flux_registry.settings)
    record = JobRecord(
        job_id="j", kind="generate_and_refine", spec=GenerateSpec(prompt="p", width=32, height=512), seed=1
    )
    with pytest.raises(InvalidInput, match="at least 256 for preset 'flux-schnell'") as raised:
        job.prepare(record, record.spec, StageTimer())
    assert raised.value.code == "invalid_input" and raised.value.field == "width"

    ok = record.model_copy(update={"spec": GenerateSpec(prompt="p", width=256, height=512)})
    key, _ = job.prepare(ok, ok.spec, StageTimer())
    assert (key.width, key.height, key.steps) == (256, 512, 4)


def test_a_flux_pairs_worker_refuses_a_tiny_pair(flux_registry):
    job = PairJob(flux_registry, ObjectStore(flux_registry.settings), flux_registry.settings)
    spec = PairSpec(
        prompt="p",
        seed=1,
        width=512,
        height=64,
        dataset="s3://refinery/d",
        pair_id="0",
        student="flux-schnell",
        teacher="flux-dev",
    )
    with pytest.raises(InvalidInput, match="at least 256") as raised:
        job.prepare(JobRecord(job_id="j", kind="pair", spec=spec, seed=1), spec, StageTimer())
    assert raised.value.field == "height"


@pytest.mark.integration
def test_celery_entry_point_refuses_model_queues(stack: LocalStack):
    env = {**os.environ, "REFINERY_REDIS_URL": stack.settings.redis_url}
    command = [sys.executable, "-m", "celery", "-A", "worker.celery_cli", "worker", "--pool=threads", "-Q"]
    refused = subprocess.run([*command, "generate"], check=False, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "queues ['generate'] need the models" in refused.stderr + refused.stdout


@pytest.mark.integration
def test_a_worker_without_its_weights_says_so_in_one_line(stack: LocalStack, tmp_path):
    """FLUX.1-schnell neither cached nor reachable (no hub here): a typed line, not a traceback."""
    env = {
        **stack.env,
        "REFINERY_MODEL_PRESET": "flux-schnell",
        "HF_HOME": str(tmp_path / "empty-hub-cache"),
        "HF_HUB_OFFLINE": "1",
        "REFINERY_METRICS_PORT": "0",
    }
    argv = [
        sys.executable,
        "-m",
        "cli",
        "worker",
        "--queues=generate",
        "--name=weightless@localstack",
        "--no-callbacks",
    ]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]  # after the libraries' own warnings and notices
    assert last.startswith("error [model_unavailable] model: cannot load flux-schnell"), done.stderr[-2000:]
    assert "REFINERY_MODEL_PATH" in last and "Traceback" not in done.stderr
