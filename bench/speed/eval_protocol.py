"""`sdvae evaluate` against the reference way of scoring a VAE, and against bare encode+decode.

The set: `--images` generated 256 px photos (random 256x256 crops of the built-in photos,
JPEG quality 90; `dvc repro download` first), a freshly initialised tiny model, this CPU, one run:
- reference: what the reference eval scripts do: reconstruct, write inputs and reconstructions
  as PNG folders, skimage per-image PSNR / SSIM (its default window) and LPIPS from the PNGs,
  then torch-fidelity's FID (and KID) of the two folders;
- ours: `score_models` on the folder (loader, per-image metrics, streaming Inception sums);
- bare: encode + decode of the same batches with no metrics and no loading (the limit).
The figures must agree within the tests' tolerances; the times are reported as ratios, with the
FLOPs per image of the model and of the metric networks (counted by torch's dispatcher), which
set what ratio is reachable. Writes the `eval` entry of metrics/bench.json.

    python bench/speed/eval_protocol.py [--images 200] [--batch-size 16]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / group) for group in ("common", "speed", "quality")
]  # bench/README.md

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from photo_sets import jpeg_crops
from results import store_entry
from sdvae.formats import save_diffusers
from sdvae.metrics import build_lpips, inception_weights
from sdvae.models import AutoencoderKL
from sdvae.scoring.features import build_inception
from sdvae.scoring.protocol import to_uint8
from sdvae.scoring.run import ScoreOptions, score_models

ROOT = Path(__file__).resolve().parents[2]
RES = 256


def load_folder(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())]


def reference(model: AutoencoderKL, images: Path, work: Path, batch: int, weights: Path) -> tuple[dict, float]:
    """Reconstruct to PNGs, then score the folders the way the reference scripts do."""
    import torch_fidelity
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    start = time.perf_counter()
    originals, recons = work / "ref-originals", work / "ref-recons"
    originals.mkdir()
    recons.mkdir()
    arrays = load_folder(images)
    for i in range(0, len(arrays), batch):
        x = torch.from_numpy(np.stack(arrays[i : i + batch])).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        with torch.no_grad():
            rec = to_uint8(model.reconstruct(x)).permute(0, 2, 3, 1).numpy()
        for j, (a, b) in enumerate(zip(arrays[i : i + batch], rec, strict=True)):
            Image.fromarray(a).save(originals / f"{i + j:05d}.png")
            Image.fromarray(b).save(recons / f"{i + j:05d}.png")
    lpips_net = build_lpips()
    psnr, ssim, lp = [], [], []
    for a_path, b_path in zip(sorted(originals.iterdir()), sorted(recons.iterdir()), strict=True):
        a, b = np.asarray(Image.open(a_path)), np.asarray(Image.open(b_path))
        psnr.append(peak_signal_noise_ratio(a, b, data_range=255))
        ssim.append(structural_similarity(a, b, channel_axis=2, data_range=255))
        ta, tb = (torch.from_numpy(v).permute(2, 0, 1)[None].float().div(127.5).sub(1) for v in (a, b))
        with torch.no_grad():
            lp.append(float(lpips_net(ta, tb)))
    fid = torch_fidelity.calculate_metrics(
        input1=str(originals), input2=str(recons), fid=True, kid=True, kid_subset_size=min(1000, len(psnr)),
        feature_extractor_weights_path=str(weights), cuda=False, verbose=False, save_cpu_ram=True,
    )  # fmt: skip
    scores = {
        "psnr": float(np.mean(psnr)),
        "ssim_uniform": float(np.mean(ssim)),
        "lpips": float(np.mean(lp)),
        "rfid": float(fid["frechet_inception_distance"]),
        "kid": float(fid["kernel_inception_distance_mean"]),
    }
    return scores, time.perf_counter() - start


def bare(model: AutoencoderKL, images: Path, batch: int) -> float:
    """Seconds to encode + decode every image, already decoded in memory, no metrics."""
    arrays = load_folder(images)
    x_all = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    start = time.perf_counter()
    with torch.no_grad():
        for x in x_all.split(batch):
            model.reconstruct(x)
    return time.perf_counter() - start


def flops_per_image(model: AutoencoderKL, weights: Path) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, RES, RES)
    nets = {"model_encode_decode": lambda: model.reconstruct(x)}
    lpips_net, inception = build_lpips(), build_inception(weights)
    nets["lpips_vgg_one_side"] = lambda: lpips_net.net(x)
    nets["inception_one_side"] = lambda: inception(to_uint8(x))
    out = {}
    for name, fn in nets.items():
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            fn()
        out[name] = counter.get_total_flops() / 1e9
    return {f"{k}_gflop": round(v, 2) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--photos", default=str(ROOT / "data/raw/train/images"))
    parser.add_argument("--out", default=str(ROOT / "metrics/bench.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny").eval()
    weights = inception_weights()
    with tempfile.TemporaryDirectory(dir=ROOT / "data") as tmp:
        work = Path(tmp)
        jpeg_crops(Path(args.photos), work / "images", (RES, RES), args.images)
        folder = save_diffusers(model, work / "tiny")
        bare_s = bare(model, work / "images", args.batch_size)
        start = time.perf_counter()
        options = ScoreOptions(resolution=RES, batch_size=args.batch_size, accelerator="cpu", workers=1, progress=False)
        ours = score_models([("tiny", str(folder))], f"folder:{work / 'images'}", options)
        ours_s = time.perf_counter() - start
        ref_scores, ref_s = reference(model, work / "images", work, args.batch_size, weights)
    assert ours is not None
    m = ours["models"]["tiny"]
    ours_scores = {
        "psnr": m["psnr"]["mean"],
        "ssim_uniform": m["ssim_uniform"]["mean"],
        "lpips": m["lpips"]["mean"],
        "rfid": m["rfid"]["value"],
        "kid": m["kid"]["mean"],
    }
    result = {
        "images": args.images,
        "resolution": RES,
        "model": "tiny (fresh init)",
        "cpu_threads": torch.get_num_threads(),
        "ours": ours_scores,
        "reference": ref_scores,
        "abs_diff": {k: abs(ours_scores[k] - ref_scores[k]) for k in ours_scores},
        "seconds": {"ours": round(ours_s, 1), "reference": round(ref_s, 1), "bare_encode_decode": round(bare_s, 1)},
        "ratio_ours_time_over_reference": round(ours_s / ref_s, 3),
        "ratio_ours_images_per_s_over_bare": round(bare_s / ours_s, 3),
        "flops_per_image": flops_per_image(model, weights),
        "command": f"python bench/speed/eval_protocol.py --images {args.images} --batch-size {args.batch_size}",
    }
    print(json.dumps(result, indent=2))
    store_entry(args.out, "eval", result)


if __name__ == "__main__":
    main()
