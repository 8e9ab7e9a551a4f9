"""`sdvae` image commands and the README's Python API example."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdvae.cli import main
from sdvae.models import AutoencoderKL

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model") / "vae"
    AutoencoderKL.from_preset("tiny", block_out_channels=(16, 32), norm_num_groups=8).save_pretrained(d)
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
    assert sizes == {"odd.png": (37, 29), "large.png": (80, 50), "small.png": (16, 16)}
    assert main(["encode", str(images), *_args(model_dir, tmp_path / "lat")]) == 0
    assert main(["decode", str(tmp_path / "lat"), *_args(model_dir, tmp_path / "dec")]) == 0
    for rec in (tmp_path / "rec").rglob("*.png"):
        dec = tmp_path / "dec" / rec.relative_to(tmp_path / "rec")
        diff = np.abs(np.asarray(Image.open(rec), int) - np.asarray(Image.open(dec), int)).max()
        assert diff <= 1, (rec.name, diff)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lat" / "odd.safetensors"), "pt") as fh:
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
