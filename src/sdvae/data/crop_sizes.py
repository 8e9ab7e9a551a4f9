"""`train.crop_sizes`: each training batch at one of several crop sizes, at equal pixels.

Why: a model trained only on 64-px crops runs on 8x8 latents, where 28 of 64 positions touch a
border and every GroupNorm takes its statistics over that small grid; scored at 128 or 256 px it
meets other statistics and another border share. Drawing each batch's size from several keeps
one size per batch (one tensor shape, one set of GroupNorm extents) and shrinks a larger-size
batch to `batch_size x (resolution / size)^2` images, so every window holds about the same
pixels and costs about the same time: the budget plan, timed at `train.resolution`, still holds.
"""

from __future__ import annotations

import torch


def images_per_batch(batch_size: int, resolution: int, size: int) -> int:
    """Images a batch of `size`-px crops keeps: the pixels of `batch_size` crops at `resolution`."""
    return max(1, round(batch_size * (resolution / size) ** 2))


class BatchSizes:
    """The crop size of each batch one loader (or loader worker) serves, item by item.

    Sizes are drawn uniformly from a generator seeded by (seed, worker, batch number), not the
    global RNG: DDP ranks with the same seed and worker count draw the same size for the same
    window, so no rank waits on another's larger crops. Items past a batch's `images_per_batch`
    are placeholders the datamodule drops after transfer (they are read, never decoded)."""

    def __init__(self, sizes: tuple[int, ...], batch_size: int, resolution: int, seed: int) -> None:
        self.sizes, self.batch_size, self.resolution, self.seed = sizes, batch_size, resolution, seed
        self.served = 0
        self.size = sizes[0]

    def next_item(self, worker: int) -> tuple[int, bool]:
        """(crop size, whether the item is kept) for the next item served."""
        slot = self.served % self.batch_size
        if slot == 0:
            batch_no = self.served // self.batch_size
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + worker) * 1_000_003 + batch_no)
            self.size = self.sizes[int(torch.randint(len(self.sizes), (), generator=gen))]
        self.served += 1
        return self.size, slot < images_per_batch(self.batch_size, self.resolution, self.size)


def keep_drawn_images(batch: torch.Tensor, batch_size: int, resolution: int) -> torch.Tensor:
    """The images of a multi-size batch that count (the rest are placeholders)."""
    return batch[: images_per_batch(batch_size, resolution, batch.shape[-1])]
