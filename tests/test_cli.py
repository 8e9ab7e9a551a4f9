"""`sdvae` image commands and the README's Python API example."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdvae.cli import main
from sdvae.formats import save_diffusers
from sdvae.models import AutoencoderKL

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model") / "vae"
    save_diffusers(AutoencoderKL.from_preset("tiny", block_out_channels=(16, 32), norm_num_groups=8), d)
    return d


@pytest.fixture()
def images(tmp_path, photos):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(photos[0]).resize((37, 29)).save(d / "odd.png")
    Image.fromarray(photos[1]).resize((80, 50)).save(d / "sub" / "large.jpg")  # larger than a 32 px tile
    Image.fromarray(photos[2]).resize((16, 16)).save(d / "small.png")
    return d


def _args(model_dir, out, *extra):
    return ["--model", str(model_dir), "-o", str(out), "--tile-size", "32", *extra]


def test_reconstruct_keeps_sizes_and_encode_decode_matches(images, model_dir, tmp_path):
    assert main(["reconstruct", str(images), *_args(model_dir, tmp_path / "rec")]) == 0
    sizes = {p.name: Image.open(p).size for p in (tmp_path / "rec").rglob("*.png")}
    assert sizes == {"odd.png.png": (37, 29), "large.jpg.png": (80, 50), "small.png.png": (16, 16)}
    assert main(["encode", str(images), *_args(model_dir, tmp_path / "lat")]) == 0
    assert main(["decode", str(tmp_path / "lat"), *_args(model_dir, tmp_path / "dec")]) == 0
    for rec in (tmp_path / "rec").rglob("*.png"):
        dec = tmp_path / "dec" / rec.relative_to(tmp_path / "rec")
        diff = np.abs(np.asarray(Image.open(rec), int) - np.asarray(Image.open(dec), int)).max()
        assert diff <= 1, (rec.name, diff)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lat" / "odd.png.safetensors"), "pt") as fh:
        meta = fh.metadata()
        assert meta["height"] == "29" and float(meta["scaling_factor"]) == pytest.approx(0.18215)
        assert fh.get_tensor("latent").shape[0] == 4


def test_bad_files_reported_rest_processed(images, model_dir, tmp_path, capsys):
    (images / "broken.png").write_text("not a png")
    code = main(["reconstruct", str(images), str(tmp_path / "missing.png"), *_args(model_dir, tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1
    assert "broken.png: not an image" in err and "missing.png: no such file" in err
    assert "3 done, 2 failed" in err
    assert len(list((tmp_path / "o").rglob("*.png"))) == 3
    code = main(["reconstruct", str(images / "odd.png"), *_args(model_dir, tmp_path / "o")])
    assert code == 1 and "exists (use --overwrite)" in capsys.readouterr().err
    assert main(["reconstruct", str(images / "odd.png"), *_args(model_dir, tmp_path / "o", "--overwrite")]) == 0


@pytest.mark.parametrize("command", ["info", "compare", "reconstruct", "encode", "decode"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0 and "usage: sdvae" in capsys.readouterr().out


def test_compare(tmp_path, photo, capsys):
    a = tmp_path / "a.png"
    Image.fromarray(photo).resize((64, 64)).save(a)
    assert main(["compare", str(a), str(a)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["lpips"] == 0.0 and scores["ssim"] == pytest.approx(1.0)
    b = tmp_path / "b.png"
    Image.fromarray(photo).resize((64, 48)).save(b)
    assert main(["compare", str(a), str(b)]) == 2
    assert "sizes differ" in capsys.readouterr().err


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "my-vae" / "config.json").is_file()


def test_same_stem_inputs_get_distinct_outputs_and_collisions_are_refused(model_dir, tmp_path, photo, capsys):
    src = tmp_path / "in"
    src.mkdir()
    small = Image.fromarray(photo).resize((24, 24))
    for ext in ("jpg", "png", "tiff", "webp", "bmp", "gif"):
        small.save(src / f"a.{ext}")
    out = tmp_path / "out"
    assert main(["reconstruct", str(src), *_args(model_dir, out, "--overwrite")]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["a.bmp.png", "a.gif.png", "a.jpg.png", "a.png.png", "a.tiff.png", "a.webp.png"]
    assert "6 done, 0 failed" in capsys.readouterr().err
    # two input roots holding the same relative path would write one output: the second is refused
    other = tmp_path / "other"
    other.mkdir()
    small.save(other / "a.jpg")
    assert main(["reconstruct", str(src / "a.jpg"), str(other / "a.jpg"), *_args(model_dir, tmp_path / "o2")]) == 1
    err = capsys.readouterr().err
    assert f"{other / 'a.jpg'}: would write" in err and "1 done, 1 failed" in err
    assert [p.name for p in (tmp_path / "o2").iterdir()] == ["a.jpg.png"]


def test_gif_is_one_rule_everywhere(model_dir, tmp_path, photo):
    """A GIF counts as an image in folders, named directly and in prepare: its first frame."""
    from sdvae.data.prepare import PrepareSpec, prepare_split

    frames = [Image.fromarray(photo).resize((64, 64)), Image.new("RGB", (64, 64), (255, 0, 0))]
    raw = tmp_path / "raw" / "images"
    raw.mkdir(parents=True)
    frames[0].save(raw / "anim.gif", save_all=True, append_images=frames[1:])
    assert main(["reconstruct", str(raw), *_args(model_dir, tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "anim.gif.png").is_file()
    manifest = prepare_split(raw.parent, tmp_path / "cache", PrepareSpec("eval", 32, 16, 10**8))
    assert manifest["images"] == ["anim.gif"] and manifest["skipped"] == []
    from sdvae.data.images import load_rgb

    first = load_rgb(raw / "anim.gif", 1, 10**8)
    assert first[..., 0].mean() < 250 or first[..., 1].mean() > 5  # the photo frame, not the red one


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height (the guard must refuse it from the header alone)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_by_default_and_guard_is_configurable(model_dir, tmp_path, capsys, photo):
    src = tmp_path / "in"
    src.mkdir()
    _png_header_only(src / "bomb.png", 20000, 20000)  # 400 M pixels, the size that used to pass
    Image.fromarray(photo).resize((24, 24)).save(src / "ok.png")
    assert main(["reconstruct", str(src), *_args(model_dir, tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "bomb.png: decompression bomb guard" in err and "400000000 pixels" in err and "1 done, 1 failed" in err
    assert (
        main(["reconstruct", str(src / "ok.png"), *_args(model_dir, tmp_path / "o2", "--max-image-pixels", "500")]) == 1
    )
    assert "exceeds limit of 500 pixels" in capsys.readouterr().err


_UNDER_MEMORY_LIMIT = """
import resource, sys
import sdvae.cli_images, sdvae.formats, sdvae.imagefiles  # load every library before the cap
from PIL import Image
Image.init()
from sdvae.cli import main
size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30), size + (1 << 30)))  # 1 GiB beyond what is mapped
sys.exit(main(sys.argv[1:]))
"""


def test_out_of_memory_on_one_file_does_not_end_the_batch(model_dir, tmp_path, photo):
    """Under a memory cap, a file too large to hold fails with one line; the others still run."""
    import subprocess
    import sys

    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (9000, 9000), (90, 120, 200)).save(src / "a_huge.png")  # 81 M pixels: ~1 GB as floats
    Image.fromarray(photo).resize((24, 24)).save(src / "b_ok.png")
    script = tmp_path / "capped.py"
    script.write_text(_UNDER_MEMORY_LIMIT)
    proc = subprocess.run(
        [sys.executable, str(script), "reconstruct", str(src), *_args(model_dir, tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "a_huge.png: out of memory" in proc.stderr and "Traceback" not in proc.stderr
    assert "1 done, 1 failed" in proc.stderr
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["b_ok.png.png"]


def test_outputs_are_written_atomically_with_shared_modes(model_dir, images, tmp_path, monkeypatch):
    import os
    import stat

    from safetensors import torch as st

    def killed(*a, **k):
        raise KeyboardInterrupt  # stands in for a kill while the file is being written

    real = st.save_file
    monkeypatch.setattr(st, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["encode", str(images / "odd.png"), *_args(model_dir, tmp_path / "lat")])
    assert not any((tmp_path / "lat").iterdir())  # nothing half-written, no temp left behind
    monkeypatch.setattr(st, "save_file", real)
    old = os.umask(0o022)
    try:
        assert main(["encode", str(images), *_args(model_dir, tmp_path / "lat")]) == 0
    finally:
        os.umask(old)
    for p in (tmp_path / "lat").rglob("*.safetensors"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


@pytest.mark.cpu_paths
def test_sixteen_channel_latents_carry_shift_and_scale_and_decode_back(tmp_path, photos):
    """FLUX / SD3 layout: the saved latent is (z - shift) * scale, its metadata says so, and
    decode undoes exactly that."""
    from safetensors import safe_open

    torch.manual_seed(0)
    flux_like = {"latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
    model = AutoencoderKL.from_preset("tiny", **flux_like, scaling_factor=0.37, shift_factor=0.12).eval()
    folder = save_diffusers(model, tmp_path / "vae16")
    Image.fromarray(photos[0]).resize((32, 32)).save(tmp_path / "a.png")
    assert main(["encode", str(tmp_path / "a.png"), "--model", str(folder), "-o", str(tmp_path / "lat")]) == 0
    with safe_open(str(tmp_path / "lat" / "a.png.safetensors"), "pt") as fh:
        meta, latent = fh.metadata(), fh.get_tensor("latent")
    assert latent.shape == (16, 4, 4)
    assert (float(meta["scaling_factor"]), float(meta["shift_factor"])) == (0.37, 0.12)
    x = torch.from_numpy(np.asarray(Image.open(tmp_path / "a.png"), np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        z = model.encode(x).mode()
    torch.testing.assert_close(latent, ((z - 0.12) * 0.37)[0], rtol=1e-5, atol=1e-6)
    assert main(["decode", str(tmp_path / "lat"), "--model", str(folder), "-o", str(tmp_path / "dec")]) == 0
    with torch.no_grad():
        expected = ((model.decode(z).clamp(-1, 1) + 1) * 127.5).round()[0].permute(1, 2, 0).numpy()
    decoded = np.asarray(Image.open(tmp_path / "dec" / "a.png.png"), np.float32)
    assert np.abs(decoded - expected).max() <= 1
    # a latent file without metadata was made for this model: its own scale and shift undo it
    from safetensors.torch import save_file

    (tmp_path / "bare").mkdir()
    save_file({"latent": latent}, str(tmp_path / "bare" / "a.safetensors"))
    assert main(["decode", str(tmp_path / "bare"), "--model", str(folder), "-o", str(tmp_path / "dec2")]) == 0
    bare = np.asarray(Image.open(tmp_path / "dec2" / "a.png"), np.float32)
    assert np.abs(bare - expected).max() <= 1


def test_info_reports_a_models_factors_and_its_fp16_decode(model_dir, capsys):
    assert main(["info", "--params", str(ROOT / "params.yaml"), "--model", str(model_dir), "--resolution", "32"]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert model["latent_channels"] == 4 and model["scaling_factor"] == pytest.approx(0.18215)
    fp16 = model["fp16_decode"]
    side = 32 // model["downsample_factor"]
    assert fp16["latents"] == [1, 4, side, side] and fp16["overflows_fp16"] is False
    assert 0 < fp16["max_abs_activation"] < fp16["fp16_max"]
