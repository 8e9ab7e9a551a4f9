"""LightningDataModule over the sharded cache: memory-mapped reads, flips, [-1, 1] floats.

Batches travel as uint8 (4x less to copy) and become floats on the device in
`on_after_batch_transfer`. Under DDP, Lightning swaps in a DistributedSampler so every rank
sees a distinct part of each epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from sdvae.data.shards import ShardReader


class ShardDataset(Dataset):
    """uint8 CHW tensors from the cache, optionally flipped left-right at random."""

    def __init__(self, root: str | Path, hflip: bool = False) -> None:
        self.reader = ShardReader(root)
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> torch.Tensor:
        img = torch.from_numpy(np.array(self.reader[index])).permute(2, 0, 1)
        if self.hflip and torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img


def to_model_range(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return batch.float().div_(127.5).sub_(1.0)


class ShardDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_dir: str | Path,
        val_dir: str | Path,
        batch_size: int,
        num_workers: int = 0,
        val_images: int = 16,
        val_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.train_dir, self.val_dir = Path(train_dir), Path(val_dir)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_images, self.val_batch_size = val_images, val_batch_size or batch_size
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        self.train_set = ShardDataset(self.train_dir, hflip=True)
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"{self.train_dir}: {len(self.train_set)} images, fewer than one batch of "
                f"{self.batch_size}; lower train.batch_size or add data"
            )
        val = ShardDataset(self.val_dir, hflip=False)
        self.val_set = Subset(val, range(min(self.val_images, len(val))))

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        kw: dict[str, Any] = {}
        if self.num_workers > 0:
            kw = {"persistent_workers": True, "prefetch_factor": 4}
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            **kw,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return self._loader(self.train_set, self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return self._loader(self.val_set, self.val_batch_size, shuffle=False, drop_last=False)

    def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> torch.Tensor:
        return to_model_range(batch)
