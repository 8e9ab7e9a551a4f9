"""Stage `export`: the diffusers folder models/vae (scaling factor computed), model card, MLflow registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from common import trained_autoencoder
from sdvae.config import load_config
from sdvae.data.datamodule import TrainImages, read_manifest, to_model_range
from sdvae.formats.diffusers import load_diffusers, save_diffusers
from sdvae.io import write_json
from sdvae.model_card import render_model_card
from sdvae.scaling import latent_statistics, shipped_factors
from sdvae.tracking import register_folder, training_run


def main() -> None:
    cfg = load_config()
    x = cfg.export
    model = load_diffusers(trained_autoencoder(cfg)[0])
    stats: dict[str, object] = {}
    if x.compute_scaling_factor:
        torch.manual_seed(cfg.data.seed)  # the crops drawn for the statistics
        train = TrainImages("data/cache/train", cfg.train.resolution, cfg.data.train_short_side, shuffle=False)
        count = read_manifest("data/cache/train")["count"]
        pick = torch.randperm(count, generator=torch.Generator().manual_seed(cfg.data.seed))[: x.scaling_images]
        loader = (to_model_range(b) for b in DataLoader(Subset(train, pick.tolist()), batch_size=cfg.eval.batch_size))
        stats = latent_statistics(model, loader, seed=cfg.data.seed)
    encoder_trained = not (cfg.train.decoder_only and cfg.train.init_from)
    model.config, factor_note = shipped_factors(model.config, stats, encoder_trained)
    stats["factor_source"] = factor_note
    scores = json.loads(Path("metrics/eval.json").read_text())
    sources = {s: json.loads(Path(f"data/raw/{s}/source.json").read_text()) for s in ("train", "eval")}
    licenses = sorted({p.name for s in ("train", "eval") for p in Path(f"data/raw/{s}/licenses").glob("*")})
    client, run_id = training_run()
    card = render_model_card(
        model,
        params=cfg.to_dict(),
        sources=sources,
        licenses=licenses,
        scores=scores,
        stats=stats,
        run_id=run_id,
        run_tags=client.get_run(run_id).data.tags,
    )
    out = save_diffusers(model, x.dir, extra_files={"README.md": card})
    for s in ("train", "eval"):
        for lic in Path(f"data/raw/{s}/licenses").glob("*"):
            (out / "licenses").mkdir(exist_ok=True)
            shutil.copy(lic, out / "licenses" / lic.name)
    result = {
        "dir": str(out),
        "scaling_factor": model.config.scaling_factor,
        "shift_factor": model.config.shift_factor,
        "scaling_factor_source": factor_note,
        "latent_stats": stats,
    }
    if x.register_model:
        result["registered_version"] = register_folder(client, run_id, out, "vae", x.model_name)
        result["registered_name"] = x.model_name
    write_json("metrics/export.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
