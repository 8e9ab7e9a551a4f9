"""Stage `evaluate`: rFID, LPIPS, PSNR, SSIM of the trained model and the bicubic baseline."""

from __future__ import annotations

from pathlib import Path

import torch

from common import pipeline_weights, trained_autoencoder
from sdvae.config import load_config
from sdvae.data.datamodule import eval_batches, read_manifest
from sdvae.evaluation import beats_baseline, evaluate_with_baseline
from sdvae.formats.diffusers import load_diffusers
from sdvae.imagefiles import save_rows
from sdvae.io import write_json
from sdvae.metrics import build_fid, build_lpips
from sdvae.tracking import log_metrics, training_run


def main() -> None:
    cfg = load_config()
    e = cfg.eval
    device = torch.device("cuda" if e.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    folder, which = trained_autoencoder(cfg)
    model = load_diffusers(folder)
    metric_weights = pipeline_weights(cfg)
    eval_images = read_manifest("data/cache/eval")["count"]
    loader = eval_batches("data/cache/eval", e.batch_size)
    scores, rows = evaluate_with_baseline(
        model,
        loader,
        build_lpips(metric_weights),
        lambda: build_fid(metric_weights),
        device,
        e.grid_images,
    )
    ours, base = scores["model"], scores["baseline"]
    caption = f"{eval_images} eval images at {e.resolution} px, {which} weights | " + " | ".join(
        f"{k.upper()} model {ours[k]:.3f} / bicubic {base[k]:.3f}" for k in ("lpips", "psnr", "ssim")
    )
    grid = save_rows(
        rows, Path("metrics/eval_grid.png"), labels=["input", f"model ({which})", "bicubic"], caption=caption
    )
    result = {
        **scores,
        "eval_images": eval_images,
        "resolution": e.resolution,
        "weights": which,
        "beats_baseline": beats_baseline(ours, base),
    }
    write_json("metrics/eval.json", result)
    client, run_id = training_run()
    log_metrics(client, run_id, scores["model"], "eval/")
    log_metrics(client, run_id, scores["baseline"], "eval_baseline/")
    client.log_artifact(run_id, str(grid), artifact_path="eval")
    client.log_artifact(run_id, "metrics/eval.json", artifact_path="eval")
    print(result)


if __name__ == "__main__":
    main()
