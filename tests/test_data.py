"""Sources, decoding of every awkward image kind, the sharded cache and the DataModule."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdvae.data.datamodule import ShardDataModule, ShardDataset
from sdvae.data.images import load_rgb
from sdvae.data.prepare import NoUsableImagesError, PrepareSpec, prepare_split
from sdvae.data.shards import ShardReader
from sdvae.data.sources import SourceError, download_split, in_eval_split, parse_source

RES = 32


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


@pytest.fixture()
def messy_folder(tmp_path, photos):
    """Good photos plus every bad or awkward kind a real folder holds."""
    d = tmp_path / "raw" / "images"
    d.mkdir(parents=True)
    good = {}
    for i, arr in enumerate(photos[:2]):
        good[f"good{i}.png"] = arr
        _save(Image.fromarray(arr), d / f"good{i}.png")
    base = Image.fromarray(photos[2]).resize((96, 80))
    # awkward but usable
    _save(base.convert("CMYK"), d / "cmyk.jpg", quality=95)
    good["cmyk.jpg"] = None
    arr16 = np.asarray(base.convert("L")).astype(np.uint16) * 257
    _save(Image.fromarray(arr16), d / "gray16.png")
    good["gray16.png"] = np.repeat(np.asarray(base.convert("L"))[..., None], 3, axis=2)
    rgba = base.convert("RGBA")
    alpha = np.full((80, 96), 255, np.uint8)
    alpha[:, :48] = 0  # left half transparent -> white
    rgba.putalpha(Image.fromarray(alpha))
    _save(rgba, d / "rgba.png")
    expected_rgba = np.asarray(base).copy()
    expected_rgba[:, :48] = 255
    good["rgba.png"] = expected_rgba
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    _save(pal, d / "palette.png", transparency=0)
    good["palette.png"] = None
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    _save(base, d / "rotated.jpg", exif=exif, quality=95)
    good["rotated.jpg"] = None
    # bad
    buf = io.BytesIO()
    Image.fromarray(photos[0]).save(buf, format="JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.jpg").write_text("this is not an image")
    _save(Image.new("RGB", (1, 1)), d / "tiny.png")
    return d.parent, good


def test_messy_folder_cache_and_manifest(messy_folder, tmp_path):
    raw, good = messy_folder
    spec = PrepareSpec(mode="eval", resolution=RES, min_size=16, max_pixels=10_000_000, shard_size=3)
    manifest = prepare_split(raw, tmp_path / "cache", spec)
    skipped = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"truncated.jpg", "empty.jpg", "notes.jpg", "tiny.png"}
    assert "truncated" in skipped["truncated.jpg"] and "0 bytes" in skipped["empty.jpg"]
    assert "not an image" in skipped["notes.jpg"] and "too small: 1x1" in skipped["tiny.png"]
    cached = {m["file"]: m for m in manifest["images"]}
    assert set(cached) == set(good)
    reader = ShardReader(tmp_path / "cache")
    assert len(reader) == len(good) and len(manifest["shards"]) == 3
    from sdvae.data.images import center_crop, resize_short_side

    for name, arr in good.items():
        if arr is not None:  # pixel check against an independent decode of the expected RGB
            expected = center_crop(resize_short_side(arr, RES), RES)
            got = reader[cached[name]["first"]]
            assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2, name
    assert cached["rotated.jpg"]["height"] == 96 and cached["rotated.jpg"]["width"] == 80  # EXIF applied
    assert cached["rgba.png"]["height"] == 80


def test_prepare_stage_exits_zero_and_warns(messy_folder, tmp_path):
    raw, _ = messy_folder
    (tmp_path / "params.yaml").write_text(
        "data: {min_size: 16, train_short_side: [40, 64], crops_per_image: 2}\n"
        "train: {resolution: 32}\neval: {resolution: 32}\n"
    )
    for split in ("train", "eval"):
        (tmp_path / "data/raw").mkdir(parents=True, exist_ok=True)
        os.symlink(raw, tmp_path / "data/raw" / split)
    stage = Path(__file__).resolve().parents[1] / "stages/prepare.py"
    proc = subprocess.run([sys.executable, str(stage)], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "warning: skipped truncated.jpg" in proc.stderr
    summary = json.loads((tmp_path / "metrics/data.json").read_text())
    assert summary["train"]["cached"] == 2 * summary["train"]["images"] and summary["eval"]["skipped"] == 4


def test_no_usable_image_is_a_clear_error(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    (d / "a.jpg").write_text("nope")
    with pytest.raises(NoUsableImagesError, match="no usable image among 1 files"):
        prepare_split(tmp_path, tmp_path / "cache", PrepareSpec("eval", RES, 16, 10**7, 4))
    assert not (tmp_path / "cache").exists()


def test_decompression_bomb_guard(tmp_path, photo):
    p = _save(Image.fromarray(photo), tmp_path / "big.png")
    with pytest.raises(Exception, match="decompression bomb"):
        load_rgb(p, 16, max_pixels=1000)


def test_train_crops_deterministic(tmp_path, photos):
    d = tmp_path / "raw" / "images"
    d.mkdir(parents=True)
    for i, arr in enumerate(photos[:2]):
        _save(Image.fromarray(arr), d / f"p{i}.png")
    spec = PrepareSpec("train", RES, 16, 10**8, 64, crops_per_image=5, short_side=(40, 200), seed=3)
    a = prepare_split(tmp_path / "raw", tmp_path / "a", spec)
    prepare_split(tmp_path / "raw", tmp_path / "b", spec)
    ra, rb = ShardReader(tmp_path / "a"), ShardReader(tmp_path / "b")
    assert a["count"] == 10 and all(np.array_equal(ra[i], rb[i]) for i in range(10))
    assert not np.array_equal(ra[0], ra[1])  # different random crops


_KILL_SCRIPT = """
import sys, time
from pathlib import Path
import numpy as np
import sdvae.data.shards as shards
real = shards.ShardWriter.flush
def slow(self):
    real(self)
    Path(sys.argv[2]).touch()
    time.sleep(30)
shards.ShardWriter.flush = slow
from sdvae.data.prepare import PrepareSpec, prepare_split
prepare_split(Path(sys.argv[1]), Path(sys.argv[3]), PrepareSpec("eval", 32, 16, 10**8, 1))
"""


def test_killed_prepare_leaves_no_half_cache(messy_folder, tmp_path):
    raw, good = messy_folder
    out, flag = tmp_path / "cache", tmp_path / "flushed"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(raw), str(flag), str(out)])
    deadline = time.time() + 60
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert flag.exists(), "writer never flushed a shard"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # only a hidden temp dir may remain
    manifest = prepare_split(raw, out, PrepareSpec("eval", 32, 16, 10**8, 1))
    assert len(ShardReader(out)) == len(good) == manifest["count"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cache.tmp")]


def test_sources_folder_split_and_errors(tmp_path, photos):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i, arr in enumerate(photos):
        _save(Image.fromarray(arr).resize((64, 64)), src / ("sub" if i % 2 else ".") / f"{i}.png")
    (src / "readme.txt").write_text("x")
    spec = f"folder:{src}"
    tr = download_split(
        spec, tmp_path / "tr", image_column="image", download_cache=tmp_path, exclude_from=spec, eval_fraction=0.5
    )
    ev = download_split(
        spec,
        tmp_path / "ev",
        image_column="image",
        download_cache=tmp_path,
        exclude_from=spec,
        eval_fraction=0.5,
        is_eval=True,
    )
    names_tr = {p.name for p in (tmp_path / "tr/images").iterdir()}
    names_ev = {p.name for p in (tmp_path / "ev/images").iterdir()}
    assert tr["images"] + ev["images"] == len(photos) and not names_tr & names_ev
    assert "sub__1.png" in names_tr | names_ev
    assert in_eval_split("0" * 64, 0.1) and not in_eval_split("f" * 64, 0.1)
    with pytest.raises(SourceError, match="expected one of hf:<dataset>"):
        parse_source("s3://bucket")
    with pytest.raises(SourceError, match="unknown built-in set"):
        parse_source("builtin:kodak")


def test_datamodule_batches_in_range(tmp_path, photos):
    d = tmp_path / "raw" / "images"
    d.mkdir(parents=True)
    for i, arr in enumerate(photos):
        _save(Image.fromarray(arr), d / f"p{i}.png")
    prepare_split(tmp_path / "raw", tmp_path / "train", PrepareSpec("train", RES, 16, 10**8, 7, 4, (32, 64)))
    prepare_split(tmp_path / "raw", tmp_path / "eval", PrepareSpec("eval", RES, 16, 10**8, 7))
    dm = ShardDataModule(tmp_path / "train", tmp_path / "eval", batch_size=4, num_workers=1, val_images=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.dtype == torch.uint8 and batch.shape == (4, 3, RES, RES)
    x = dm.on_after_batch_transfer(batch, 0)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert len(dm.val_set) == 3
    assert len(ShardDataset(tmp_path / "train")) == 4 * len(photos)
