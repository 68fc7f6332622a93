"""A job's image must not depend on the batch it landed in (bit-exact on CPU fp32)."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from devstack.stack import LocalStack
from producer.client import Client
from shared.contract import JobState
from shared.objects import ObjectStore
from shared.settings import Settings
from worker.handlers.generate import GenerateItem, GenerateJob, GenerateKey
from worker.handlers.refine import RefineItem, RefineJob, RefineKey
from worker.registry import ModelRegistry

PROMPTS = ["portrait of an old man", "portrait of a young woman", "portrait of a child", "portrait of a bald man"]
SEEDS = [3, 1, 4, 1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> ModelRegistry:
    settings = Settings(
        _env_file=None, model_preset="tiny-schnell", device="cpu", model_cache_dir=tmp_path_factory.mktemp("models")
    )
    registry = ModelRegistry(settings)
    # A refiner that is not the identity, so refinement is part of what must match.
    refiner = registry.refiners.get(registry.refiners.choose("any job", pin=None))
    torch.nn.init.normal_(refiner.network.conv_out.weight, std=0.05)
    return registry


def test_batched_generate_and_refine_equal_single_runs(registry):
    work = GenerateJob(registry, ObjectStore(registry.settings), registry.settings).run_batch
    key = GenerateKey(width=64, height=48, steps=4, guidance=0.0)
    refiner = registry.refiners.choose("any job", pin=None)
    items = [GenerateItem(p, s, refiner, drawn=True) for p, s in zip(PROMPTS, SEEDS)]

    batched = work(key, items)
    singles = [work(key, [item])[0] for item in items]

    assert registry.batch_invariant
    for b, s in zip(batched, singles):
        assert torch.equal(b.raw, s.raw)
        assert torch.equal(b.refined, s.refined)
        assert not torch.equal(b.refined, b.raw)
    # The seeds that repeat give the same noise but different prompts: different images.
    assert not torch.equal(batched[1].raw, batched[3].raw)


def test_refine_only_batches_equal_single_runs(registry):
    work = RefineJob(registry, ObjectStore(registry.settings), registry.settings).run_batch
    images = [torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    items = [RefineItem(image, drawn=True) for image in images]
    key = RefineKey(width=56, height=40, refiner=registry.refiners.choose("any job", pin=None))
    batched = work(key, items)
    singles = [work(key, [item])[0] for item in items]
    assert all(torch.equal(b.refined, s.refined) for b, s in zip(batched, singles))


@pytest.mark.integration
def test_jobs_batched_by_the_worker_match_jobs_run_alone(client, tmp_path):
    # Alone: one job at a time through the session's worker (nothing to batch with).
    alone = [client.submit_generate(p, seed=s, width=64, height=64).wait(60) for p, s in zip(PROMPTS, SEEDS)]
    # Together: a worker that waits long enough for all four to arrive.
    with LocalStack(tmp_path, max_batch=4, max_wait_ms=5000) as stack:
        stack.start_worker("worker")
        batch_client = Client(stack.settings)
        handles = [batch_client.submit_generate(p, seed=s, width=64, height=64) for p, s in zip(PROMPTS, SEEDS)]
        together = [h.wait(60) for h in handles]
        images = [batch_client.storage.get(r.result.uri) for r in together]

    assert all(r.state is JobState.succeeded for r in alone + together)
    assert [r.batch_size for r in alone] == [1, 1, 1, 1]
    assert [r.batch_size for r in together] == [4, 4, 4, 4]
    for record, batched_png in zip(alone, images):
        single_png = client.storage.get(record.result.uri)
        assert Image.open(io.BytesIO(single_png)).tobytes() == Image.open(io.BytesIO(batched_png)).tobytes()
