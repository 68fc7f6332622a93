"""The model registry on the tiny FLUX presets: real diffusers code paths, CPU, seconds."""

from __future__ import annotations

import threading

import pytest
import torch

from shared.errors import InvalidInput
from shared.presets import PRESETS, get_preset
from shared.settings import Settings
from worker.models import (
    SHARED_COMPONENTS,
    HubSource,
    OfflineDoubleSource,
    generate,
    lent_components,
    load_pipeline,
    resolve_device,
    resolve_dtype,
    source_of,
    warm_up,
)
from worker.registry import ModelRegistry
from worker.tiny_flux import build_tiny_pipeline, ensure_tiny_pipeline_saved

PROMPTS = [
    "portrait of a 30-year-old woman with curly red hair, soft window light",
    "close-up of an elderly man with a gray beard, studio backdrop, 85mm",
    "a smiling teenager wearing a blue hoodie, outdoors, golden hour",
    "headshot of a bald man in a suit, rembrandt lighting, bokeh",
]
SEEDS = [11, 22, 33, 44]
CPU = torch.device("cpu")


def run(pipe, prompts, seeds, *, size=(64, 64), steps=None, guidance=None, preset="tiny-schnell"):
    p = get_preset(preset)
    return generate(
        pipe,
        prompts,
        seeds,
        width=size[0],
        height=size[1],
        steps=steps or p.steps,
        guidance=p.guidance if guidance is None else guidance,
        max_sequence_length=p.max_sequence_length,
    )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def schnell(cache_dir):
    return load_pipeline(
        get_preset("tiny-schnell"), model_path=None, cache_dir=cache_dir, device=CPU, dtype=torch.float32
    )


@pytest.fixture(scope="module")
def dev(cache_dir, schnell):
    return load_pipeline(
        get_preset("tiny-dev"),
        model_path=None,
        cache_dir=cache_dir,
        device=CPU,
        dtype=torch.float32,
        shared=lent_components(schnell, get_preset("tiny-schnell")),
    )


def test_same_seed_same_image_and_other_seed_differs(schnell):
    first = run(schnell, PROMPTS[:1], [7])
    assert torch.equal(first, run(schnell, PROMPTS[:1], [7]))
    assert (first - run(schnell, PROMPTS[:1], [8])).abs().mean() > 0.05


def test_prompt_changes_the_image(schnell):
    a, b = run(schnell, PROMPTS[0:1], [7]), run(schnell, PROMPTS[1:2], [7])
    assert (a - b).abs().mean() > 1e-3


def test_batch_matches_single_calls(schnell):
    batch = run(schnell, PROMPTS, SEEDS)
    singles = torch.cat([run(schnell, [prompt], [seed]) for prompt, seed in zip(PROMPTS, SEEDS)])
    # Not bit-exact on CPU: MKL's M=1 GEMV and oneDNN's per-batch-size convolutions sum in
    # a different order than the batched kernels (measured max 3e-6). Far below 1/255.
    torch.testing.assert_close(batch, singles, rtol=0, atol=1e-5)
    # ...and far below the difference between images, so the check above can fail.
    assert (batch[0] - batch[1]).abs().mean() > 0.05


def test_saved_and_loaded_pipeline_matches_the_built_one(schnell, cache_dir):
    built = build_tiny_pipeline("tiny-schnell")
    built.set_progress_bar_config(disable=True)
    assert torch.equal(run(built, PROMPTS, SEEDS), run(schnell, PROMPTS, SEEDS))
    # Built once: a second call returns the existing directory untouched.
    path = ensure_tiny_pipeline_saved("tiny-schnell", cache_dir)
    stamp = (path / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_pipeline_saved("tiny-schnell", cache_dir) == path
    assert (path / "model_index.json").stat().st_mtime_ns == stamp


def test_building_does_not_disturb_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_tiny_pipeline("tiny-dev")
    assert torch.equal(torch.rand(3), expected)


def test_racing_savers_both_get_a_complete_directory(tmp_path):
    barrier, paths = threading.Barrier(2), []

    def save():
        barrier.wait()
        paths.append(ensure_tiny_pipeline_saved("tiny-dev", tmp_path))

    threads = [threading.Thread(target=save) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(paths)) == 1 and paths[0].parent == tmp_path
    # The loser's temporary directory is gone; only the complete one remains.
    assert list(tmp_path.iterdir()) == [paths[0]]
    loaded = load_pipeline(get_preset("tiny-dev"), model_path=None, cache_dir=tmp_path, device=CPU, dtype=torch.float32)
    built = build_tiny_pipeline("tiny-dev")
    built.set_progress_bar_config(disable=True)
    args = dict(steps=4, preset="tiny-dev")
    assert torch.equal(run(loaded, PROMPTS[:2], SEEDS[:2], **args), run(built, PROMPTS[:2], SEEDS[:2], **args))


def test_pair_shares_everything_but_the_transformer_and_the_students_low_pass(cache_dir):
    # Loaded separately (nothing shared): equal weights must come from the shared seed.
    schnell, dev = (
        load_pipeline(get_preset(name), model_path=None, cache_dir=cache_dir, device=CPU, dtype=torch.float32)
        for name in ("tiny-schnell", "tiny-dev")
    )
    for name in ("vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(schnell, name).state_dict(), getattr(dev, name).state_dict()
        differ = {k for k in a if not torch.equal(a[k], b[k])}
        # The student's VAE is the teacher's but for its decoder's last convolution (the blur).
        assert a.keys() == b.keys() and differ == ({"decoder.conv_out.weight"} if name == "vae" else set()), name
    assert schnell.tokenizer_2.get_vocab() == dev.tokenizer_2.get_vocab()
    assert not schnell.transformer.config.guidance_embeds and dev.transformer.config.guidance_embeds
    a, b = schnell.transformer.state_dict(), dev.transformer.state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a.keys() & b.keys())


def test_student_and_teacher_images_differ(schnell, dev):
    student = run(schnell, PROMPTS, SEEDS)
    teacher = run(dev, PROMPTS, SEEDS, preset="tiny-dev")
    assert (student - teacher).abs().mean() > 0.02


def test_dev_uses_guidance_and_schnell_ignores_it(schnell, dev):
    low, high = (run(dev, PROMPTS[:1], [7], steps=4, guidance=g, preset="tiny-dev") for g in (1.0, 3.5))
    assert (low - high).abs().mean() > 1e-4
    assert torch.equal(run(schnell, PROMPTS[:1], [7], guidance=1.0), run(schnell, PROMPTS[:1], [7], guidance=3.5))


def test_teacher_reuses_the_components_the_student_lends(schnell, dev):
    for name in SHARED_COMPONENTS:
        assert (getattr(dev, name) is getattr(schnell, name)) == (name != "vae"), name
    assert dev.transformer is not schnell.transformer


@pytest.mark.parametrize(("width", "height", "batch"), [(64, 48, 2), (32, 32, 1)])
def test_output_shape_and_range(schnell, width, height, batch):
    images = run(schnell, PROMPTS[:batch], SEEDS[:batch], size=(width, height))
    assert images.shape == (batch, 3, height, width)
    assert images.dtype == torch.float32 and images.device.type == "cpu"
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.05


def test_generate_refuses_mismatched_seeds(schnell):
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        run(schnell, PROMPTS[:2], [1])


def test_warm_up_runs_at_the_smallest_size(schnell, dev):
    warm_up(schnell, get_preset("tiny-schnell"))
    warm_up(dev, get_preset("tiny-dev"))


def test_presets():
    assert set(PRESETS) == {"flux-schnell", "flux-dev", "tiny-schnell", "tiny-dev", "bench-schnell", "noop"}
    schnell, dev = get_preset("flux-schnell"), get_preset("flux-dev")
    assert (schnell.model_id, schnell.steps, schnell.guidance) == ("black-forest-labs/FLUX.1-schnell", 4, 0.0)
    assert (dev.model_id, dev.steps, dev.guidance) == ("black-forest-labs/FLUX.1-dev", 28, 3.5)
    assert isinstance(source_of(get_preset("tiny-schnell")), OfflineDoubleSource)
    assert isinstance(source_of(schnell), HubSource)
    with pytest.raises(InvalidInput) as caught:
        get_preset("nope")
    assert caught.value.field == "preset" and caught.value.code == "invalid_input"
    assert all(name in caught.value.message for name in PRESETS)


def test_the_free_model_answers_what_the_worker_asks_of_a_pipeline(tmp_path):
    # As a pairs worker on the free model: student and teacher, batch-invariant, warmed up.
    settings = Settings(
        _env_file=None,
        model_preset="noop",
        teacher_preset="noop",
        refiner="noop",
        batch_invariant="on",
        model_cache_dir=tmp_path,
    )
    registry = ModelRegistry(settings)
    registry.warm_up({"pipeline", "teacher"})
    assert lent_components(registry.pipeline, registry.preset) == {}
    images = run(registry.teacher, PROMPTS[:2], SEEDS[:2], size=(32, 48), preset="noop")
    assert images.shape == (2, 3, 48, 32)
    # Loaded, but no weights to cache: nothing for `refinery doctor` to warn about.
    assert registry.describe()["weights"] == {}
    assert list(tmp_path.iterdir()) == []


def test_resolve_device_and_dtype():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == CPU
    assert resolve_dtype("auto", CPU) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype("float16", CPU) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", CPU)
