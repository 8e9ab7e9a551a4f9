"""Stage `evaluate`: the trained model and the bicubic baseline through `sdvae evaluate`'s protocol."""

from __future__ import annotations

from pathlib import Path

from common import pipeline_weights, trained_autoencoder
from sdvae.config import load_config
from sdvae.io import write_json
from sdvae.scoring.report import better_than, flat_metrics, save_grid
from sdvae.scoring.run import ScoreOptions, score_models
from sdvae.tracking import log_metrics, training_run, ui_link

EVAL_CACHE = "data/cache/eval"


def main() -> None:
    cfg = load_config()
    e = cfg.eval
    folder, which = trained_autoencoder(cfg)
    accelerator = {"auto": "auto", "cuda": "gpu", "cpu": "cpu"}[e.device]
    options = ScoreOptions(
        resolution=e.resolution, batch_size=e.batch_size, accelerator=accelerator, workers=0, grid_images=e.grid_images
    )
    result = score_models([("model", str(folder)), ("bicubic", "bicubic")], EVAL_CACHE, options, pipeline_weights(cfg))
    assert result is not None  # one process: rank 0
    grid = save_grid(result, Path("metrics/eval_grid.png"))
    ours, base = flat_metrics(result["models"]["model"]), flat_metrics(result["models"]["bicubic"])
    summary = {
        "model": ours,
        "baseline": base,
        "beats_baseline": better_than(ours, base),
        "eval_images": result["images"],
        "resolution": e.resolution,
        "weights": which,
    }
    write_json("metrics/eval.json", {**summary, **{k: v for k, v in result.items() if k != "grid"}})
    client, run_id = training_run()
    log_metrics(client, run_id, ours, "eval/")
    log_metrics(client, run_id, base, "eval_baseline/")
    if grid is not None:
        client.log_artifact(run_id, str(grid), artifact_path="eval")
    client.log_artifact(run_id, "metrics/eval.json", artifact_path="eval")
    print(summary)
    experiment = client.get_run(run_id).info.experiment_id
    print(f"mlflow ui --backend-store-uri {client.tracking_uri}, then open {ui_link(experiment, run_id)}")


if __name__ == "__main__":
    main()
