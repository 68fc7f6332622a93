"""Model presets: which FLUX pipeline a worker loads, how it samples by default, and the
smallest image it makes. Producers check sizes against the same table before submitting;
workers check against the preset they have loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.errors import InvalidInput

MIN_SIZE = 256  # real FLUX presets
MIN_SIZE_TINY = 32  # the offline doubles, for tests and the demo


@dataclass(frozen=True)
class Preset:
    name: str
    # Where its models come from; the worker has one object per source (worker/models.py):
    # "hub": FluxPipeline.from_pretrained(model_id, or REFINERY_MODEL_PATH);
    # "offline-double": tiny random weights built locally by worker.tiny_flux, never fetched;
    # "free": no model at all, images of the requested size for almost no CPU
    # (worker/free_model.py), so a benchmark measures the system alone (benchmarks/ceiling.py).
    source: Literal["hub", "offline-double", "free"]
    # Hub id or local path: the "hub" presets'.
    model_id: str | None
    steps: int
    guidance: float
    # T5 tokens per prompt: schnell was distilled with 256, dev uses 512.
    max_sequence_length: int
    # Smallest width/height the preset is used at.
    min_size: int
    # Whether a pairs worker lends this student's VAE to its teacher (as FLUX's pair share
    # one). The offline student decodes through a low-passed VAE of its own instead: that
    # is how the double loses detail (worker/tiny_flux.py).
    lends_vae: bool = True

    def check_size(self, width: int, height: int) -> None:
        for field, value in (("width", width), ("height", height)):
            if value < self.min_size:
                raise InvalidInput(f"must be at least {self.min_size} for preset {self.name!r}", field=field)


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("flux-schnell", "hub", "black-forest-labs/FLUX.1-schnell", 4, 0.0, 256, MIN_SIZE),
        Preset("flux-dev", "hub", "black-forest-labs/FLUX.1-dev", 28, 3.5, 512, MIN_SIZE),
        # Offline test doubles of the pair above: same FluxPipeline class, tiny random
        # weights (worker/tiny_flux.py). Their images are not portraits. 77 tokens, like
        # the CLIP window, so both text encoders see the same prompt.
        Preset("tiny-schnell", "offline-double", None, 4, 0.0, 77, MIN_SIZE_TINY, lends_vae=False),
        Preset("tiny-dev", "offline-double", None, 28, 3.5, 77, MIN_SIZE_TINY),
        # A larger random-weight schnell double, sized for the throughput benchmark.
        Preset("bench-schnell", "offline-double", None, 4, 0.0, 77, MIN_SIZE_TINY),
        # The free model; REFINERY_REFINER=noop is its refiner.
        Preset("noop", "free", None, 1, 0.0, 77, MIN_SIZE_TINY),
    )
}

# The job contract's lower bound: no preset goes below it.
SMALLEST_SIZE = min(preset.min_size for preset in PRESETS.values())


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidInput(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}", field="preset") from None
