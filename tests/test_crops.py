"""Training crops come from a decode at least as large as the drawn scale: never upsampled."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdvae.data.datamodule import TrainImages, random_crop, random_crop_encoded
from sdvae.data.encoding import decode, encode
from sdvae.data.images import short_side_size
from sdvae.data.prepare import PrepareSpec, prepare_split

# libjpeg's scaled IDCT (1/2, 1/4, 1/8) is a low-pass downscale of its own, not the bicubic
# antialias the full decode is resized with: the two differ by a filter, not by resolution.
# Measured on these photos, per 64 px window: PSNR at least 27.6 dB between the two (astronaut's
# fine texture squeezed to 341x192, the worst case), 46 dB at 512 px. Integer IDCT and Pillow's
# resampling do not depend on the CPU's instruction set.
SCALED_IDCT_MIN_PSNR_DB = 25.0


def _jpeg(photo: np.ndarray, width: int, height: int) -> bytes:
    return encode(np.asarray(Image.fromarray(photo).resize((width, height), Image.Resampling.BICUBIC)), "JPEG", 95)


def _seeds_drawing_each_short_side(lo: int, hi: int) -> dict[int, int]:
    """{short side: a generator seed whose first draw in [lo, hi] is that short side}."""
    found: dict[int, int] = {}
    seed = 0
    while len(found) < hi - lo + 1:
        found.setdefault(int(torch.randint(lo, hi + 1, (), generator=torch.Generator().manual_seed(seed))), seed)
        seed += 1
    return found


def _dct_scale_reaches(width: int, height: int, short: int) -> bool:
    w, h = short_side_size(width, height, short)
    return min(width // w, height // h) >= 2


# stored sizes: the embedded default's (short side 192) and the GPU preset's (512, ImageNet's 500x375)
@pytest.mark.parametrize(
    ("width", "height", "short_side"),
    [
        (341, 192, (64, 192)),
        (256, 192, (64, 192)),
        (288, 192, (64, 192)),
        (768, 512, (256, 512)),
        (910, 512, (256, 512)),
        (500, 375, (256, 512)),
    ],
)
def test_every_drawn_scale_equals_the_full_resolution_decode_resized(photos, width, height, short_side):
    resolution = min(64, short_side[0])
    for photo in photos[:2]:  # astronaut (fine texture, the worst case) and chelsea
        data = _jpeg(photo, width, height)
        full = decode(data)
        for short, seed in _seeds_drawing_each_short_side(*short_side).items():
            crop = random_crop_encoded(data, resolution, short_side, torch.Generator().manual_seed(seed))
            reference = random_crop(full, resolution, short_side, torch.Generator().manual_seed(seed))
            assert crop.shape == reference.shape == (resolution, resolution, 3)
            if _dct_scale_reaches(width, height, short):
                mse = np.mean((crop.astype(np.float64) - reference) ** 2)
                psnr = 10 * np.log10(255**2 / max(mse, 1e-12))
                assert psnr >= SCALED_IDCT_MIN_PSNR_DB, (width, height, short, psnr)
            else:  # no reduced decode can reach this scale: the pixels are the full decode's, exactly
                assert np.array_equal(crop, reference), (width, height, short)


def _prepare_three_photos(tmp_path, photos) -> None:
    """A train cache of three photos (stored short side 192) at tmp_path/train."""
    raw = tmp_path / "raw" / "images"
    raw.mkdir(parents=True)
    for i, arr in enumerate(photos[:3]):
        Image.fromarray(arr).save(raw / f"p{i}.jpg", quality=95)
    prepare_split(tmp_path / "raw", tmp_path / "train", PrepareSpec("train", 32, 16, 10**8, max_short_side=192))


def test_crops_are_deterministic_per_seed_and_keep_their_distribution(tmp_path, photos):
    _prepare_three_photos(tmp_path, photos)

    def crops(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        images = TrainImages(tmp_path / "train", 32, (32, 192), shuffle=False)
        return [images[i % 3] for i in range(30)]

    first, again, other = crops(0), crops(0), crops(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    # the window is drawn inside the scaled image: flips and positions vary across reads of one file
    assert len({bytes(c.numpy()) for c in first[::3]}) == 10


def test_smooth_crops_keep_the_colours_and_lose_the_detail(tmp_path, photos):
    """`data.smooth_share`: that share of crops is the crop's content at 1/2 to 1/8 resolution,
    bicubic back up: the same mean colour, far less high-frequency power, same shape and dtype."""
    from sdvae.data.datamodule import smoothed
    from sdvae.scoring.diffusability import high_frequency_share

    crop = torch.from_numpy(np.ascontiguousarray(photos[0][:64, :64])).permute(2, 0, 1)
    torch.manual_seed(0)
    smooth = smoothed(crop)
    assert smooth.shape == crop.shape and smooth.dtype == torch.uint8
    assert torch.allclose(smooth.float().mean(dim=(1, 2)), crop.float().mean(dim=(1, 2)), atol=2.0)
    assert float(high_frequency_share(smooth[None].float())) < 0.3 * float(high_frequency_share(crop[None].float()))

    _prepare_three_photos(tmp_path, photos)
    torch.manual_seed(0)
    plain = [TrainImages(tmp_path / "train", 32, (32, 192), shuffle=False)[i % 3] for i in range(40)]
    torch.manual_seed(0)
    images = TrainImages(tmp_path / "train", 32, (32, 192), shuffle=False, smooth_share=0.5)
    mixed = [images[i % 3] for i in range(40)]
    shares = [float(high_frequency_share(c[None].float())) for c in (*plain, *mixed)]
    smoothest_plain = min(shares[:40])
    assert 8 <= sum(s < smoothest_plain for s in shares[40:]) <= 32  # about half, and only those


def test_recoloured_crops_are_grey_or_reordered_and_keep_the_structure(tmp_path, photos):
    """`data.recolor_share`: that share of crops comes back grey (luma in all three channels) or
    with its RGB channels in another order; the rest, and every crop's shape, stay as they were."""
    from sdvae.data.datamodule import recolored

    crop = torch.from_numpy(np.ascontiguousarray(photos[0][:64, :64])).permute(2, 0, 1)
    torch.manual_seed(0)
    grey = 0
    orders = set()
    for _ in range(200):
        out = recolored(crop)
        assert out.shape == crop.shape and out.dtype == torch.uint8
        if torch.equal(out[0], out[1]) and torch.equal(out[1], out[2]):
            grey += 1
            # ITU-R 601 luma, truncated to an integer (torchvision's rgb_to_grayscale)
            luma = 0.2989 * crop[0].float() + 0.587 * crop[1].float() + 0.114 * crop[2].float()
            gap = luma - out[0].float()
            assert float(gap.min()) > -0.01 and float(gap.max()) < 1.01
        else:
            order = tuple(next(c for c in range(3) if torch.equal(out[i], crop[c])) for i in range(3))
            assert order != (0, 1, 2)
            orders.add(order)
    assert 30 <= grey <= 70  # a quarter of 200
    assert len(orders) == 5  # every other order of the channels

    _prepare_three_photos(tmp_path, photos)

    def reads(images: TrainImages) -> list[torch.Tensor]:
        # one seed per read: scale, position and flip are drawn first, so each crop has a plain twin
        crops = []
        for i in range(60):
            torch.manual_seed(i)
            crops.append(images[i % 3])
        return crops

    plain = reads(TrainImages(tmp_path / "train", 32, (32, 192), shuffle=False))
    mixed = reads(TrainImages(tmp_path / "train", 32, (32, 192), shuffle=False, recolor_share=0.5))
    changed = [not torch.equal(a, b) for a, b in zip(plain, mixed, strict=True)]
    same_pixels = [
        torch.equal(a.sort(dim=0).values, b.sort(dim=0).values) or bool((b[0] == b[1]).all() and (b[1] == b[2]).all())
        for a, b in zip(plain, mixed, strict=True)
    ]
    assert 15 <= sum(changed) <= 45 and all(same_pixels)
