"""Image sources, materialised as a plain folder of files (+ licenses) for the prepare stage.

`folder:<path>` copies a local tree; `hf:<name>[:split]` uses `datasets.load_dataset` (needs a
hub); `builtin:*` are real photos that exist offline: Debian packages fetched with
`apt-get download` and unpacked with `dpkg-deb -x` (no install), or scikit-image's bundled set.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from sdvae.data.common import SourceError, content_hash, in_eval_split
from sdvae.data.hf import record_source

__all__ = [
    "IMAGE_SUFFIXES",
    "SourceError",
    "content_hash",
    "download_split",
    "image_files",
    "in_eval_split",
    "iter_source",
]

# One rule everywhere (download, prepare, the CLI): these are images; a multi-frame file
# (animated GIF or WebP, multi-page TIFF) contributes its first frame.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


@dataclass(frozen=True)
class DebianPick:
    package: str
    directory: str
    accept: Callable[[str], bool]
    prefix: str = ""  # added to file names that repeat across directories (1920x1080.jpg)


def _all(_: str) -> bool:
    return True


_LOMIRI_EXCLUDED = ("umang", "analogpattern")
_CLASSIC = {
    "examples/data": {
        "aero1.jpg",
        "aloeL.jpg",
        "apple.jpg",
        "baboon.jpg",
        "board.jpg",
        "building.jpg",
        "butterfly.jpg",
        "ela_original.jpg",
        "fruits.jpg",
        "graf1.png",
        "home.jpg",
        "left.jpg",
        "leuvenA.jpg",
        "messi5.jpg",
        "orange.jpg",
        "pca_test1.jpg",
        "rubberwhale1.png",
        "smarties.png",
        "squirrel_cls.jpg",
        "stuff.jpg",
    },
    "examples/alphamat/input_images": {"plant.jpg"},
    # scenetext04 is left out: a heavily compressed JPEG (quality ~29) would teach artefacts.
    "examples/text": {"scenetext01.jpg", "scenetext02.jpg", "scenetext03.jpg", "scenetext05.jpg", "scenetext06.jpg"},
}

BUILTIN_DEBIAN: dict[str, list[DebianPick]] = {
    "photos": [
        DebianPick("mate-backgrounds", "usr/share/backgrounds/mate/nature", _all),
        DebianPick(
            "lomiri-wallpapers-16.04",
            "usr/share/backgrounds",
            lambda n: "_by_" in n and n.endswith(".jpg") and not n.startswith(_LOMIRI_EXCLUDED),
        ),
        DebianPick("palapeli-data", "usr/share/palapeli/collection", _all),
        DebianPick("puzzle-jigsaw", "usr/share/puzzle-jigsaw/samples", _all),
    ],
    "classic": [
        DebianPick("opencv-doc", f"usr/share/doc/opencv-doc/{d}", lambda n, names=names: n in names)
        for d, names in _CLASSIC.items()
    ],
}
# Photos in no train or eval set of the project, to check that scores carry over to unseen
# images (bench/quality/out_of_set.py): the photographic KDE Plasma wallpapers (the others are
# renders) and the one photo of Lomiri's 20.04 set.
_PLASMA_PHOTOS = {
    "BytheWater": "1920x1080.jpg",
    "ColdRipple": "1920x1080.jpg",
    "ColorfulCups": "2560x1600.jpg",
    "DarkestHour": "1920x1080.jpg",
    "EveningGlow": "1920x1080.jpg",
    "FallenLeaf": "1920x1080.jpg",
    "Grey": "1920x1080.jpg",
    "Kite": "1920x1080.jpg",
    "OneStandsOut": "1920x1080.jpg",
    "Path": "1920x1080.jpg",
    "summer_1am": "1920x1080.jpg",
}
BUILTIN_DEBIAN["unseen"] = [
    DebianPick(
        "plasma-workspace-wallpapers",
        f"usr/share/wallpapers/{name}/contents/images",
        lambda n, size=size: n == size,
        prefix=f"{name}_",
    )
    for name, size in _PLASMA_PHOTOS.items()
] + [DebianPick("lomiri-wallpapers-20.04", "usr/share/backgrounds", lambda n: n == "Kleiber_by_Lukas_Baubkus.jpg")]
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right")


def skimage_photo(name: str):  # type: ignore[no-untyped-def]
    """One of scikit-image's bundled RGB photos (uint8 HWC); the motorcycle pair is a stereo pair."""
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(skimage.data, name)()


def parse_source(spec: str) -> tuple[str, str]:
    kind, _, rest = spec.partition(":")
    builtins = ", ".join(f"builtin:{name}" for name in (*BUILTIN_DEBIAN, "skimage"))
    allowed = f"hf:<dataset>[:split], folder:<path>, {builtins}"
    if kind not in ("hf", "folder", "builtin") or not rest:
        raise SourceError(f"data source {spec!r}: expected one of {allowed}")
    if kind == "builtin" and rest not in (*BUILTIN_DEBIAN, "skimage"):
        raise SourceError(f"data source {spec!r}: unknown built-in set; expected one of {allowed}")
    if kind == "hf" and not rest.partition(":")[0].strip():
        raise SourceError(f"data source {spec!r}: no dataset name; expected hf:<dataset>[:split]")
    return kind, rest


def check_available(spec: str) -> None:
    """Fail before any work when a local source is missing (remote ones are checked when read)."""
    kind, rest = parse_source(spec)
    if kind == "folder" and not Path(rest).expanduser().is_dir():
        raise SourceError(f"folder source {rest}: no such directory")


# -- per-kind iterators: yield (file name, raw bytes) ---------------------------------------------------
def image_files(root: Path) -> list[Path]:
    """Every image file under `root`, sorted (the one rule of what counts as an image)."""
    if not root.is_dir():
        raise SourceError(f"folder source {root}: not a directory")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _iter_folder(root: Path) -> Iterator[tuple[str, bytes]]:
    for p in image_files(root):
        yield str(p.relative_to(root)).replace("/", "__"), p.read_bytes()


def _iter_skimage(licenses: Path) -> Iterator[tuple[str, bytes]]:
    import skimage
    from PIL import Image

    readme = Path(skimage.__file__).parent / "data" / "README.txt"
    licenses.mkdir(parents=True, exist_ok=True)
    if readme.is_file():
        shutil.copy(readme, licenses / "scikit-image-data-README.txt")
    for name in SKIMAGE_PHOTOS:
        buf = io.BytesIO()
        Image.fromarray(skimage_photo(name)).save(buf, format="PNG")
        yield f"skimage__{name}.png", buf.getvalue()


def _iter_debian(picks: list[DebianPick], deb_cache: Path, licenses: Path) -> Iterator[tuple[str, bytes]]:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise SourceError(
            "built-in photo sets need apt-get and dpkg-deb (Debian/Ubuntu); "
            "use data.*_source: builtin:skimage or folder:<path> instead"
        )
    deb_cache.mkdir(parents=True, exist_ok=True)
    licenses.mkdir(parents=True, exist_ok=True)
    for package in dict.fromkeys(p.package for p in picks):
        debs = sorted(deb_cache.glob(f"{package}_*.deb"))
        if not debs:
            proc = subprocess.run(["apt-get", "download", package], cwd=deb_cache, capture_output=True, text=True)
            debs = sorted(deb_cache.glob(f"{package}_*.deb"))
            if not debs:
                raise SourceError(
                    f"apt-get download {package} failed: {proc.stderr.strip()[-400:]}; "
                    "try `apt-get update`, or use builtin:skimage / folder:<path>"
                )
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["dpkg-deb", "-x", str(debs[-1]), tmp], check=True)
            copyright_file = Path(tmp) / "usr/share/doc" / package / "copyright"
            if copyright_file.is_file():
                shutil.copy(copyright_file, licenses / f"{package}.copyright")
            for pick in (p for p in picks if p.package == package):
                folder = Path(tmp) / pick.directory
                for f in sorted(folder.iterdir()) if folder.is_dir() else []:
                    if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and pick.accept(f.name):
                        yield f"{package}__{pick.prefix}{f.name}", f.read_bytes()


def iter_source(spec: str, image_column: str, download_cache: Path, licenses: Path) -> Iterator[tuple[str, bytes]]:
    kind, rest = parse_source(spec)
    if kind == "folder":
        return _iter_folder(Path(rest).expanduser())
    if kind == "hf":
        raise SourceError("hf: sources are read by prepare from datasets' cache, not copied (sdvae.data.hf)")
    if rest == "skimage":
        return _iter_skimage(licenses)
    return _iter_debian(BUILTIN_DEBIAN[rest], download_cache / "debs", licenses)


def download_split(
    spec: str,
    out: Path,
    *,
    image_column: str,
    download_cache: Path,
    max_images: int = 0,
    exclude_from: str | None = None,
    eval_fraction: float = 0.1,
    is_eval: bool = False,
) -> dict:
    """Write the images of one split into `out/images/` (licenses in `out/licenses/`); for `hf:`
    sources only `out/source.json` (see sdvae.data.hf).

    When train and eval share a source (`exclude_from` == `spec`), the content-hash split
    keeps every image on one side only.
    """
    shared = exclude_from is not None and exclude_from == spec
    if parse_source(spec)[0] == "hf":
        return record_source(spec, out, image_column, max_images, shared, eval_fraction, is_eval)
    images, licenses = out / "images", out / "licenses"
    images.mkdir(parents=True, exist_ok=True)
    kept, digests = 0, []
    for name, data in tqdm(
        iter_source(spec, image_column, download_cache, licenses), desc=f"download {spec}", unit="img"
    ):
        digest = content_hash(data)
        if shared and in_eval_split(digest, eval_fraction) != is_eval:
            continue
        (images / name).write_bytes(data)
        digests.append(digest)
        kept += 1
        if max_images and kept >= max_images:
            break
    if kept == 0:
        raise SourceError(f"source {spec!r} yielded no image files")
    fingerprint = hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()
    info = {"source": spec, "images": kept, "fingerprint": fingerprint, "shared_source_split": shared}
    (out / "source.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
