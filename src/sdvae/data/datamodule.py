"""Datasets and the LightningDataModule over the litdata cache.

Training images are decoded in the DataLoader workers and cropped fresh on every read: the
short side is drawn from `data.train_short_side` (a JPEG is then decoded at the smallest DCT scale
that reaches it), then a random `train.resolution` window and a random left-right flip, so no
two epochs see the same crops (`data.smooth_share` and `data.recolor_share` swap a share of them
for detail-free or recoloured versions). Eval images are stored already cropped and come back as
they are. Batches travel as uint8 (4x less to copy) and become floats
in [-1, 1] on the device in `on_after_batch_transfer`.

Under DDP `StreamingDataset` gives every rank a distinct part of each epoch. Lightning saves
`StreamingDataLoader`'s position in checkpoints: a resumed run continues the interrupted epoch
with the next unseen samples (`training.callbacks.ClosesResumedEpoch` makes the next epoch a
fresh one). A train cache prepared to `data.cache_uri` is streamed from there.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from litdata import StreamingDataLoader, StreamingDataset
from torch.utils.data import DataLoader, Subset
from torchvision.transforms.v2.functional import rgb_to_grayscale

from sdvae.data.crop_sizes import BatchSizes, keep_drawn_images
from sdvae.data.encoding import decode, decode_resized, stored_size
from sdvae.data.images import resize_to, short_side_size
from sdvae.data.prepare import FORMAT, MANIFEST
from sdvae.latent_transforms import resize


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no {MANIFEST}; run the prepare stage (dvc repro prepare)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}; re-run prepare")
    return manifest


def draw_window(
    width: int, height: int, resolution: int, short_side: tuple[int, int], generator: torch.Generator | None = None
) -> tuple[tuple[int, int], int, int]:
    """A random scale and window: ((width, height) to resize to, top, left). The short side is
    drawn from `short_side` (never below `resolution`), then a `resolution` window inside it."""
    lo, hi = max(short_side[0], resolution), max(short_side[1], resolution)
    size = short_side_size(width, height, int(torch.randint(lo, hi + 1, (), generator=generator)))
    top = int(torch.randint(0, size[1] - resolution + 1, (), generator=generator))
    left = int(torch.randint(0, size[0] - resolution + 1, (), generator=generator))
    return size, top, left


def random_crop(
    img: np.ndarray, resolution: int, short_side: tuple[int, int], generator: torch.Generator | None = None
) -> np.ndarray:
    """A random-scale `resolution` window of a decoded image."""
    size, top, left = draw_window(img.shape[1], img.shape[0], resolution, short_side, generator)
    return resize_to(img, size)[top : top + resolution, left : left + resolution]


def random_crop_encoded(
    data: bytes, resolution: int, short_side: tuple[int, int], generator: torch.Generator | None = None
) -> np.ndarray:
    """The same draw as `random_crop`, from encoded bytes: the scale is drawn first and the image
    decoded at the smallest DCT scale that reaches it, so the crop is never upsampled from a
    reduced decode (only from the stored image itself, when the draw exceeds it)."""
    size, top, left = draw_window(*stored_size(data), resolution, short_side, generator)
    return decode_resized(data, size)[top : top + resolution, left : left + resolution]


class TrainImages(StreamingDataset):
    """uint8 CHW crops drawn fresh at every read (random scale, position and flip)."""

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        short_side: tuple[int, int],
        seed: int = 0,
        shuffle: bool = True,
        return_ids: bool = False,
        stream_cache: str | None = None,
        smooth_share: float = 0.0,
        recolor_share: float = 0.0,
        batch_sizes: BatchSizes | None = None,
    ) -> None:
        manifest = read_manifest(root)
        source = manifest.get("remote") or str(Path(root).resolve())  # data.cache_uri: streamed
        # stream_cache: where chunks of a remote cache land (None: litdata's default, ~/.lightning/chunks)
        super().__init__(source, shuffle=shuffle, drop_last=True, seed=seed, cache_dir=stream_cache)
        self.resolution, self.short_side, self.return_ids = resolution, short_side, return_ids
        self.smooth_share, self.recolor_share = smooth_share, recolor_share
        self.batch_sizes = batch_sizes  # train.crop_sizes: each batch one drawn size

    def __getitem__(self, index: Any) -> torch.Tensor | tuple[torch.Tensor, str]:
        sample = super().__getitem__(index)
        size = self.resolution
        if self.batch_sizes is not None:
            info = torch.utils.data.get_worker_info()
            size, kept = self.batch_sizes.next_item(info.id if info is not None else 0)
            if not kept:  # dropped after transfer: not worth decoding
                placeholder = torch.zeros(3, size, size, dtype=torch.uint8)
                return (placeholder, f"{sample['name']}#{sample['copy']}") if self.return_ids else placeholder
        img = random_crop_encoded(sample["image"], size, self.short_side)
        out = torch.from_numpy(np.array(img)).permute(2, 0, 1)  # a writable copy
        out = out.flip(-1) if torch.rand(()) < 0.5 else out
        if self.smooth_share > 0 and torch.rand(()) < self.smooth_share:
            out = smoothed(out)
        if self.recolor_share > 0 and torch.rand(()) < self.recolor_share:
            out = recolored(out)
        # the sample's identity (file and copy), for checking epochs, resumes and DDP splits
        return (out, f"{sample['name']}#{sample['copy']}") if self.return_ids else out


def smoothed(crop: torch.Tensor) -> torch.Tensor:
    """The crop's content at 1/2 to 1/8 of its resolution (anti-aliased), brought back by bicubic:
    a real photo's colours and gradients without its detail. `data.smooth_share` of the crops are
    these, for the smooth photos (skies, walls, night) the default otherwise rarely trains on."""
    side = crop.shape[-1]
    factor = 2.0 ** (1.0 + 2.0 * float(torch.rand(())))
    small = max(2, round(side / factor))
    x = F.interpolate(
        resize(crop[None], (small, small)), size=tuple(crop.shape[-2:]), mode="bicubic", align_corners=False
    )
    return x[0].round().clamp(0, 255).to(torch.uint8)


_OTHER_ORDERS = tuple(p for p in itertools.permutations(range(3)) if p != (0, 1, 2))  # RGB excluded


def recolored(crop: torch.Tensor) -> torch.Tensor:
    """The crop in grey (its luma in all three channels; a quarter of the draws) or with its RGB
    channels in one of the five other orders. Thirty-two photos show few colours; the unseen
    photos the default lost on are a grey pier that came back tinted and skies that came back
    the wrong blue. Both keep the crop's structure and luminance range, to teach colour apart
    from the photos it came with (over three seeds: within the spread, docs/quality.md; off by default)."""
    if torch.rand(()) < 0.25:
        return rgb_to_grayscale(crop, num_output_channels=3)
    order = _OTHER_ORDERS[int(torch.randint(len(_OTHER_ORDERS), ()))]
    return crop[list(order)]


class EvalImages(StreamingDataset):
    """uint8 CHW eval images, exactly as prepare stored them, in a fixed order."""

    def __init__(self, root: str | Path) -> None:
        self.manifest = read_manifest(root)
        super().__init__(str(Path(root).resolve()), shuffle=False, drop_last=False)

    def __getitem__(self, index: Any) -> torch.Tensor:
        sample = super().__getitem__(index)
        return torch.from_numpy(np.array(decode(sample["image"]))).permute(2, 0, 1)  # a writable copy


def to_model_range(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return batch.float().div_(127.5).sub_(1.0)


def eval_batches(root: str | Path, batch_size: int, limit: int | None = None) -> Any:
    """Float batches in [-1, 1] of the first `limit` eval images (all by default), in cache order."""
    dataset = EvalImages(root)
    count = dataset.manifest["count"] if limit is None else min(limit, dataset.manifest["count"])
    loader = DataLoader(Subset(dataset, range(count)), batch_size=batch_size)
    return (to_model_range(b) for b in loader)


class ImageDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_dir: str | Path,
        val_dir: str | Path,
        batch_size: int,
        resolution: int,
        short_side: tuple[int, int],
        num_workers: int = 0,
        val_images: int = 16,
        seed: int = 0,
        smooth_share: float = 0.0,
        recolor_share: float = 0.0,
        crop_sizes: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.smooth_share, self.recolor_share = smooth_share, recolor_share
        self.crop_sizes = crop_sizes
        self.train_dir, self.val_dir = Path(train_dir), Path(val_dir)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.resolution, self.short_side, self.seed = resolution, short_side, seed
        self.val_images = val_images
        self.train_set: TrainImages | None = None
        self.val_set: Subset | None = None

    def setup(self, stage: str | None = None) -> None:
        count = read_manifest(self.train_dir)["count"]
        if count < self.batch_size:
            raise ValueError(
                f"{self.train_dir}: {count} training samples, fewer than one batch of {self.batch_size}; "
                "lower train.batch_size, raise data.samples_per_image or add data"
            )
        self.train_set = TrainImages(
            self.train_dir,
            self.resolution,
            self.short_side,
            self.seed,
            smooth_share=self.smooth_share,
            recolor_share=self.recolor_share,
            batch_sizes=BatchSizes(self.crop_sizes, self.batch_size, self.resolution, self.seed)
            if self.crop_sizes
            else None,
        )
        val = EvalImages(self.val_dir)
        self.val_set = Subset(val, range(min(self.val_images, val.manifest["count"])))

    def train_dataloader(self) -> StreamingDataLoader:
        assert self.train_set is not None
        kw: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": 4} if self.num_workers > 0 else {}
        # Lightning saves and restores a StreamingDataLoader's position in its checkpoints itself.
        return StreamingDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            drop_last=True,
            **kw,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=0)

    def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> torch.Tensor:
        if self.crop_sizes and self.trainer is not None and self.trainer.training:
            batch = keep_drawn_images(batch, self.batch_size, self.resolution)
        return to_model_range(batch)
