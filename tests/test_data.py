"""Sources, decoding of every awkward image kind, the litdata cache and the DataModule."""

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
from litdata import StreamingDataLoader, StreamingDataset
from PIL import Image

from sdvae.data.datamodule import EvalImages, ImageDataModule, TrainImages
from sdvae.data.encoding import decode
from sdvae.data.images import load_rgb
from sdvae.data.prepare import NoUsableImagesError, PrepareSpec, prepare_split
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


def _stored(root: Path) -> dict[str, dict]:
    """Every cache entry by `name#copy`, as litdata stores it."""
    raw = StreamingDataset(str(root))
    return {f"{s['name']}#{s['copy']}": s for s in (raw[i] for i in range(len(raw)))}


def test_messy_folder_cache_and_manifest(messy_folder, tmp_path):
    raw, good = messy_folder
    spec = PrepareSpec(mode="eval", resolution=RES, min_size=16, max_pixels=10_000_000, num_workers=2)
    manifest = prepare_split(raw, tmp_path / "cache", spec)
    skipped = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"truncated.jpg", "empty.jpg", "notes.jpg", "tiny.png"}
    assert "truncated" in skipped["truncated.jpg"] and "0 bytes" in skipped["empty.jpg"]
    assert "not an image" in skipped["notes.jpg"] and "too small: 1x1" in skipped["tiny.png"]
    assert set(manifest["images"]) == set(good) and manifest["count"] == len(good)
    stored = _stored(tmp_path / "cache")
    from sdvae.data.images import center_crop, resize_short_side

    for name, arr in good.items():
        got = decode(stored[f"{name}#0"]["image"])
        assert got.shape == (RES, RES, 3) and stored[f"{name}#0"]["stored"] == "png"  # eval: lossless
        if arr is not None:  # pixel check against an independent decode of the expected RGB
            expected = center_crop(resize_short_side(arr, RES), RES)
            assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2, name
    rotated = stored["rotated.jpg#0"]
    assert (rotated["height"], rotated["width"]) == (96, 80)  # EXIF applied
    assert len(EvalImages(tmp_path / "cache").manifest["images"]) == len(good)


def test_train_storage_keeps_small_jpegs_and_downscales_the_rest(tmp_path, photos):
    d = tmp_path / "raw" / "images"
    d.mkdir(parents=True)
    _save(Image.fromarray(photos[0]).resize((150, 100)), d / "small.jpg", quality=90)
    _save(Image.fromarray(photos[1]), d / "big.jpg", quality=90)  # 451x300: short side above 128
    _save(Image.fromarray(photos[2]).resize((150, 100)), d / "small.png")
    spec = PrepareSpec("train", RES, 16, 10**8, max_short_side=128, jpeg_quality=90)
    prepare_split(tmp_path / "raw", tmp_path / "cache", spec)
    stored = _stored(tmp_path / "cache")
    assert stored["small.jpg#0"]["image"] == (d / "small.jpg").read_bytes()  # original bytes kept
    assert stored["small.jpg#0"]["stored"] == "original" and stored["big.jpg#0"]["stored"] == "jpeg"
    assert min(decode(stored["big.jpg#0"]["image"]).shape[:2]) == 128
    assert stored["small.png#0"]["stored"] == "png"
    assert np.array_equal(decode(stored["small.png#0"]["image"]), load_rgb(d / "small.png", 16, 10**8))


def test_prepare_stage_exits_zero_and_warns(messy_folder, tmp_path):
    raw, _ = messy_folder
    (tmp_path / "params.yaml").write_text(
        "data: {min_size: 16, train_short_side: [40, 64], samples_per_image: 2, num_workers: 2}\n"
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
    assert {s["file"] for s in summary["eval"]["skipped_files"]} == {
        "truncated.jpg",
        "empty.jpg",
        "notes.jpg",
        "tiny.png",
    }


def test_no_usable_image_is_a_clear_error(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    (d / "a.jpg").write_text("nope")
    with pytest.raises(NoUsableImagesError, match=r"no usable image among 1 files; skipped: a\.jpg: not an image"):
        prepare_split(tmp_path, tmp_path / "cache", PrepareSpec("eval", RES, 16, 10**7))
    assert not (tmp_path / "cache").exists()


def test_decompression_bomb_guard(tmp_path, photo):
    p = _save(Image.fromarray(photo), tmp_path / "big.png")
    with pytest.raises(Exception, match="decompression bomb"):
        load_rgb(p, 16, max_pixels=1000)


def test_parallel_prepare_equals_serial(tmp_path, photos):
    d = tmp_path / "raw" / "images"
    d.mkdir(parents=True)
    for i, arr in enumerate(photos):
        _save(Image.fromarray(arr), d / f"p{i}.jpg", quality=90)
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    spec = PrepareSpec("train", RES, 16, 10**8, max_short_side=96, samples_per_image=2)
    serial = prepare_split(tmp_path / "raw", tmp_path / "one", spec)
    parallel = prepare_split(tmp_path / "raw", tmp_path / "two", PrepareSpec(**{**spec.__dict__, "num_workers": 2}))
    assert serial["params_hash"] == parallel["params_hash"] and serial["skipped"] == parallel["skipped"]
    a, b = _stored(tmp_path / "one"), _stored(tmp_path / "two")
    assert set(a) == set(b) and len(a) == 2 * len(photos)
    assert all(a[k]["image"] == b[k]["image"] for k in a)
    # Parallel prepares are reproducible: the same inputs give byte-identical chunks and manifest,
    # so re-running prepare does not change the sample order nor the run a checkpoint belongs to.
    again = prepare_split(tmp_path / "raw", tmp_path / "three", PrepareSpec(**{**spec.__dict__, "num_workers": 2}))
    assert again == parallel
    chunks = sorted(p.name for p in (tmp_path / "two").glob("chunk-*.bin"))
    assert len(chunks) == 2 and chunks == sorted(p.name for p in (tmp_path / "three").glob("chunk-*.bin"))
    assert all((tmp_path / "two" / c).read_bytes() == (tmp_path / "three" / c).read_bytes() for c in chunks)


def test_fresh_crops_every_epoch(tmp_path, photos):
    d = tmp_path / "raw" / "images"
    d.mkdir(parents=True)
    for i, arr in enumerate(photos[:4]):
        _save(Image.fromarray(arr), d / f"p{i}.png")
    prepare_split(tmp_path / "raw", tmp_path / "cache", PrepareSpec("train", RES, 16, 10**8, max_short_side=96))
    images = TrainImages(tmp_path / "cache", RES, (RES, 96), shuffle=False, return_ids=True)
    loader = StreamingDataLoader(images, batch_size=2)
    epochs = []
    for _ in range(2):
        epochs.append({i: x for xs, ids in loader for x, i in zip(xs, ids, strict=True)})
    assert set(epochs[0]) == set(epochs[1]) == {f"p{i}.png#0" for i in range(4)}
    assert all(x.shape == (3, RES, RES) and x.dtype == torch.uint8 for x in epochs[0].values())
    assert all(not torch.equal(epochs[0][k], epochs[1][k]) for k in epochs[0])  # new crop each epoch


_KILL_SCRIPT = """
import sys, time
from pathlib import Path
import sdvae.data.prepare as prepare
real = prepare._prepare_one
def slow(name, **kw):
    yield from real(name, **kw)
    Path(sys.argv[2]).touch()
    time.sleep(60)
prepare._prepare_one = slow
prepare.prepare_split(Path(sys.argv[1]), Path(sys.argv[3]), prepare.PrepareSpec("eval", 32, 16, 10**8, num_workers=2))
"""


def test_killed_prepare_leaves_no_half_cache(messy_folder, tmp_path):
    raw, good = messy_folder
    out, flag = tmp_path / "cache", tmp_path / "flushed"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(raw), str(flag), str(out)], start_new_session=True)
    deadline = time.time() + 60
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert flag.exists(), "no worker got past its first image"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, workers included
    proc.wait()
    assert not out.exists()  # only a hidden temp dir may remain
    manifest = prepare_split(raw, out, PrepareSpec("eval", 32, 16, 10**8))
    assert manifest["count"] == len(good) == len(_stored(out))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cache.")]


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
    with pytest.raises(SourceError, match=r"unknown built-in set.*builtin:unseen, builtin:skimage"):
        parse_source("builtin:kodak")
    assert parse_source("builtin:unseen") == ("builtin", "unseen")


def test_datamodule_batches_in_range(tmp_path, photos):
    d = tmp_path / "raw" / "images"
    d.mkdir(parents=True)
    for i, arr in enumerate(photos):
        _save(Image.fromarray(arr), d / f"p{i}.png")
    prepare_split(tmp_path / "raw", tmp_path / "train", PrepareSpec("train", RES, 16, 10**8, 64, samples_per_image=4))
    prepare_split(tmp_path / "raw", tmp_path / "eval", PrepareSpec("eval", RES, 16, 10**8))
    dm = ImageDataModule(tmp_path / "train", tmp_path / "eval", 4, RES, (32, 64), num_workers=1, val_images=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.dtype == torch.uint8 and batch.shape == (4, 3, RES, RES)
    x = dm.on_after_batch_transfer(batch, 0)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert len(dm.val_set) == 3 and next(iter(dm.val_dataloader())).shape == (3, 3, RES, RES)
    assert len(dm.train_dataloader()) == 4 * len(photos) // 4
    small = ImageDataModule(tmp_path / "train", tmp_path / "eval", 64, RES, (32, 64))
    with pytest.raises(ValueError, match=r"fewer than one batch of 64; lower train\.batch_size, raise data\.samples"):
        small.setup("fit")


def test_hf_source_streams_rows_into_the_cache_without_image_files(tmp_path, photos):
    """A dataset `datasets` loads offline (a local imagefolder), split into train and eval by
    content: no per-image files in data/raw, the fingerprint recorded, every row on one side."""
    src = tmp_path / "hfdata" / "train"
    src.mkdir(parents=True)
    for i, arr in enumerate(photos):
        _save(Image.fromarray(arr).resize((96, 80)), src / f"{i}.jpg", quality=90)
    spec = f"hf:{tmp_path / 'hfdata'}"
    raw = {}
    for split in ("train", "eval"):
        info = download_split(
            spec,
            tmp_path / "raw" / split,
            image_column="image",
            download_cache=tmp_path,
            exclude_from=spec,
            eval_fraction=0.5,
            is_eval=split == "eval",
        )
        assert (
            info["rows"] == len(photos) and info["fingerprint"] and not (tmp_path / "raw" / split / "images").exists()
        )
        raw[split] = info
    train = prepare_split(tmp_path / "raw/train", tmp_path / "cache/train", PrepareSpec("train", RES, 16, 10**8))
    evals = prepare_split(tmp_path / "raw/eval", tmp_path / "cache/eval", PrepareSpec("eval", RES, 16, 10**8))
    assert not set(train["images"]) & set(evals["images"])
    assert len(train["images"]) + len(evals["images"]) == len(photos) and train["skipped"] == evals["skipped"] == []
    assert train["source_fingerprint"] == raw["train"]["fingerprint"]
    assert all(s["stored"] == "original" for s in _stored(tmp_path / "cache/train").values())  # JPEG bytes as they were
