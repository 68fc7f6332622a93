"""The pairs dataset on local disk, its train/val split, and a resumable batch order.

The layout and the manifest row are `shared.datasets`' (what the pair generator writes; S3
datasets are synced to such a directory first). A pair counts once its manifest row and
both images exist, so a dataset still being generated can be trained on: half-written pairs
are skipped.

The split depends on each pair's id alone (SHA-1 of the id mapped to [0, 1), below
`val_fraction` is validation), so adding pairs never moves existing ones between splits
and every tool (training, evaluation) agrees on which pairs are held out.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from refiner.pixels import to_tensor
from shared.datasets import MANIFEST_DIR, PAIR_IMAGES, PAIRS_DIR, ManifestRow, pair_id_of, pair_paths

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "all")


def split_of(pair_id: str, val_fraction: float) -> str:
    """`"val"` or `"train"` for `pair_id`, from a hash of the id alone."""
    digest = hashlib.sha1(pair_id.encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return "val" if position < val_fraction else "train"


def load_image(path: Path) -> torch.Tensor:
    """A PNG (or any PIL-readable image) as a `(3, H, W)` float32 tensor in [0, 1]."""
    with Image.open(path) as image:
        return to_tensor(image.convert("RGB"))


class PairDataset(Dataset):
    """Student/teacher pairs of one split.

    Args:
        root: the dataset directory (holding `pairs/` and `manifest/`, `shared.datasets`).
        split: `"train"`, `"val"` or `"all"`.
        resolution: crop both images of a pair to `resolution x resolution` at the same
            place, or `None` for full images. Images smaller than the crop raise.
        val_fraction: share of pair ids that are validation.
        seed: seeds the crop positions (and the unpaired partner) drawn for integer keys.
        random_crop: random crops (default for `"train"`) or centre crops (default otherwise).
        unpaired: the teacher image comes from another, randomly drawn pair (CycleGAN must
            not see the correspondence); the item then also has `teacher_pair_id`.

    Items are dicts `{"student": (3, H, W), "teacher": (3, H, W), "pair_id": str}`, floats in
    [0, 1]. `rows[i]` is the `ManifestRow` of item `i` (prompt, attributes, timings...).

    A key is an index, or a tuple `(index, draw_seed)` as yielded by `ResumableBatchSampler`:
    then the crop position (and unpaired partner) come from `draw_seed` alone, so a batch is
    the same whenever and wherever it is drawn (resume, DataLoader workers). With plain
    indices they come from one generator seeded by `seed`, in the order items are read.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        resolution: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        random_crop: bool | None = None,
        unpaired: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if resolution is not None and resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
        self.root = Path(root)
        if not (self.root / MANIFEST_DIR).is_dir() or not (self.root / PAIRS_DIR).is_dir():
            raise FileNotFoundError(f"no pairs dataset at {self.root}: expected {PAIRS_DIR}/ and {MANIFEST_DIR}/ in it")
        self.split = split
        self.resolution = resolution
        self.val_fraction = val_fraction
        self.random_crop = split == "train" if random_crop is None else random_crop
        self.unpaired = unpaired
        self._rng = random.Random(seed)

        # 1. Every complete pair, in pair-id order, filtered to the split.
        self.pair_ids: list[str] = []
        self.rows: list[ManifestRow] = []
        incomplete = 0
        for manifest in sorted((self.root / MANIFEST_DIR).glob("*.json")):
            pair_id = pair_id_of(manifest.name)
            if split != "all" and split_of(pair_id, val_fraction) != split:
                continue
            paths = pair_paths(pair_id)
            if not all((self.root / paths[role]).is_file() for role in PAIR_IMAGES):
                incomplete += 1
                continue
            self.pair_ids.append(pair_id)
            self.rows.append(ManifestRow.model_validate_json(manifest.read_text()))
        if incomplete:
            logger.warning("%s: skipped %d pairs whose images are missing", self.root, incomplete)

    def __len__(self) -> int:
        return len(self.pair_ids)

    def _paths(self, index: int) -> tuple[Path, Path]:
        paths = pair_paths(self.pair_ids[index])
        return self.root / paths["student"], self.root / paths["teacher"]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, rng = (key[0], random.Random(key[1])) if isinstance(key, tuple) else (key, self._rng)
        student_path, teacher_path = self._paths(index)
        partner = rng.randrange(len(self)) if self.unpaired else index
        if self.unpaired:
            teacher_path = self._paths(partner)[1]
        student, teacher = load_image(student_path), load_image(teacher_path)
        if student.shape != teacher.shape:
            raise ValueError(
                f"pair {self.pair_ids[index]}: student is {tuple(student.shape[1:])} but teacher "
                f"{'of ' + self.pair_ids[partner] + ' ' if self.unpaired else ''}is {tuple(teacher.shape[1:])}"
            )
        if self.resolution is not None:
            student, teacher = self._crop(student, teacher, self.resolution, rng, self.pair_ids[index])
        item = {"student": student, "teacher": teacher, "pair_id": self.pair_ids[index]}
        if self.unpaired:
            item["teacher_pair_id"] = self.pair_ids[partner]
        return item

    def _crop(
        self, student: torch.Tensor, teacher: torch.Tensor, size: int, rng: random.Random, pair_id: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = student.shape[-2:]
        if height < size or width < size:
            raise ValueError(f"pair {pair_id}: image {height}x{width} is smaller than resolution {size}")
        if self.random_crop:
            top, left = rng.randint(0, height - size), rng.randint(0, width - size)
        else:
            top, left = (height - size) // 2, (width - size) // 2
        window = (..., slice(top, top + size), slice(left, left + size))
        return student[window], teacher[window]

    def summary(self) -> dict[str, Any]:
        """What a run records about its data: root, split, pair count, sizes seen."""
        sizes = sorted({f"{row.width}x{row.height}" for row in self.rows})
        return {
            "root": str(self.root),
            "split": self.split,
            "pairs": len(self),
            "val_fraction": self.val_fraction,
            "image_sizes": sizes,
            "resolution": self.resolution,
        }


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """An endless stream of batches of keys `(index, draw_seed)`, a pure function of the step.

    The global stream visits the dataset in epochs, each a permutation seeded by
    `(seed, epoch)`; position `p` of the stream gets draw seed `(seed, p)`. Global step `s`
    takes positions `[s * B * R, (s + 1) * B * R)` (B the per-process batch size, R the
    number of processes) and process `rank` takes its slice of them, so every process gets
    different data, and a run resumed at `start_step` continues exactly where it stopped.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int = 0,
        start_step: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if num_items < 1:
            raise ValueError("cannot sample batches from an empty dataset")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.num_replicas = num_replicas
        self.rank = rank
        self._epoch = -1
        self._order: list[int] = []

    def _index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_items)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_items, generator=generator).tolist()
        return self._order[offset]

    def batch_at(self, step: int) -> list[tuple[int, int]]:
        """This process's keys for global step `step`."""
        first = (step * self.num_replicas + self.rank) * self.batch_size
        return [
            (self._index_at(position), (self.seed << 40) + position)
            for position in range(first, first + self.batch_size)
        ]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch_at(step)
            step += 1


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, list strings; images of one batch must share a size (crop, or one size)."""
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(
                    f"images of different sizes in one batch ({sorted(shapes)}): set a training resolution"
                )
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


def batched_pairs(dataset: PairDataset, count: int, batch_size: int) -> Iterator[dict[str, Any]]:
    """The first `count` pairs, batched; consecutive pairs of one size go together."""
    batch: list[dict[str, Any]] = []
    for index in range(min(count, len(dataset))):
        item = dataset[index]
        if batch and (item["student"].shape != batch[0]["student"].shape or len(batch) == batch_size):
            yield collate_pairs(batch)
            batch = []
        batch.append(item)
    if batch:
        yield collate_pairs(batch)
