"""The refiner: a lightweight residual U-Net with CBAM attention that turns FLUX.1-schnell
portraits into more realistic ones at under 1% of the generator's cost (after Wąsala et al.,
arXiv 2505.02255). `RefinerUNet` is the diffusers-style network (saved and loaded with
`save_pretrained` / `from_pretrained`, safetensors only), `load_refiner` builds a `Refiner`
from a weights directory, or the identity when none is given, and `Refiner` runs it on a
batch of images in [0, 1]. This package is the ML side only: it imports no queue or storage
client.
"""

from refiner.loading import Refiner, load_refiner
from refiner.network import RefinerUNet

__all__ = ["Refiner", "RefinerUNet", "load_refiner"]
