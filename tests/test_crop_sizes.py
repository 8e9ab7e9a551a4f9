"""Multi-size training (`train.crop_sizes`): one size per batch, equal pixels, same draw on every rank."""

from __future__ import annotations

import pytest
import torch

from sdvae.config import ConfigError, config_from_dict
from sdvae.data.crop_sizes import BatchSizes, images_per_batch, keep_drawn_images


def _serve(sizes: BatchSizes, batches: int, worker: int = 0) -> list[list[tuple[int, bool]]]:
    return [[sizes.next_item(worker) for _ in range(sizes.batch_size)] for _ in range(batches)]


def test_every_batch_has_one_size_and_keeps_the_pixels_of_a_base_batch():
    served = _serve(BatchSizes((64, 96, 128), 8, 64, seed=0), 60)
    for batch in served:
        assert len({size for size, _ in batch}) == 1
        size = batch[0][0]
        kept = [k for _, k in batch]
        # kept items come first, then placeholders: the datamodule keeps the head of the batch
        assert kept == [True] * images_per_batch(8, 64, size) + [False] * (8 - images_per_batch(8, 64, size))
    drawn = [b[0][0] for b in served]
    assert {64, 96, 128} == set(drawn)
    assert (images_per_batch(8, 64, 64), images_per_batch(8, 64, 96), images_per_batch(8, 64, 128)) == (8, 4, 2)


def test_ranks_with_the_same_seed_draw_the_same_size_for_the_same_window():
    rank0, rank1 = BatchSizes((64, 128), 4, 64, seed=3), BatchSizes((64, 128), 4, 64, seed=3)
    assert _serve(rank0, 20) == _serve(rank1, 20)
    other_seed = [b[0][0] for b in _serve(BatchSizes((64, 128), 4, 64, seed=4), 20)]
    other_worker = [b[0][0] for b in _serve(BatchSizes((64, 128), 4, 64, seed=3), 20, worker=1)]
    this = [b[0][0] for b in _serve(BatchSizes((64, 128), 4, 64, seed=3), 20)]
    assert other_seed != this and other_worker != this


def test_keep_drawn_images_drops_the_placeholders():
    assert keep_drawn_images(torch.zeros(8, 3, 128, 128), 8, 64).shape[0] == 2
    assert keep_drawn_images(torch.zeros(8, 3, 64, 64), 8, 64).shape[0] == 8


@pytest.mark.parametrize(
    ("sizes", "why"),
    [
        ([32], r"sizes >= train\.resolution 64, each a multiple of the model's downsampling factor 8, got \[32\]"),
        ([64, 100], r"got \[64, 100\]"),
        ([], r"expected a non-empty list of int"),
    ],
)
def test_crop_sizes_below_the_resolution_or_off_the_latent_grid_are_refused_by_name(sizes, why):
    with pytest.raises(ConfigError, match=r"train\.crop_sizes: .*" + why):
        config_from_dict({"train": {"resolution": 64, "crop_sizes": sizes}})
