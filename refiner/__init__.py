"""The refiner: a lightweight residual U-Net with CBAM attention that turns FLUX.1-schnell
portraits into more realistic ones at a small fraction of the generator's cost (measured in
`benchmarks/results/refiner_cost.json`; after Wąsala et al., arXiv 2505.02255).

What the worker needs: `load_refiner` builds a `Refiner` from an exported directory, or the
identity (version `IDENTITY`) when none is given, and `Refiner` runs it on a batch of images
in [0, 1]; `to_pil` / `to_tensor` convert between those images and PIL. Training, evaluation
and their parts live in the submodules. This package is the ML side only: it imports no
queue or storage client.
"""

from refiner.export import IDENTITY, Refiner, load_refiner
from refiner.networks import RefinerUNet
from refiner.pixels import to_pil, to_tensor

__all__ = ["IDENTITY", "Refiner", "RefinerUNet", "load_refiner", "to_pil", "to_tensor"]
