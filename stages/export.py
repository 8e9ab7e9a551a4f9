"""Stage `export`: the diffusers folder models/vae (scaling factor computed), model card, MLflow registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from common import trained_autoencoder
from sdvae.config import load_config
from sdvae.convert import ConversionError, check_dtype
from sdvae.data.datamodule import TrainImages, read_manifest, to_model_range
from sdvae.formats.diffusers import load_diffusers, save_diffusers
from sdvae.formats.ldm import save_ldm
from sdvae.fp16_safety import fp16_decode_report, guarded_config
from sdvae.io import write_json
from sdvae.model_card import render_model_card
from sdvae.scaling import latent_statistics, shipped_factors
from sdvae.tracking import register_folder, training_run


def main() -> None:
    cfg = load_config()
    x = cfg.export
    model = load_diffusers(trained_autoencoder(cfg)[0])
    torch.manual_seed(cfg.data.seed)  # the crops drawn for the statistics and the fp16 check
    train = TrainImages("data/cache/train", cfg.train.resolution, cfg.data.train_short_side, shuffle=False)
    count = read_manifest("data/cache/train")["count"]
    pick = torch.randperm(count, generator=torch.Generator().manual_seed(cfg.data.seed))[: x.scaling_images]
    loader = DataLoader(Subset(train, pick.tolist()), batch_size=cfg.eval.batch_size)
    stats: dict[str, object] = {}
    if x.compute_scaling_factor:
        stats = latent_statistics(model, (to_model_range(b) for b in loader), seed=cfg.data.seed)
    encoder_trained = not (cfg.train.decoder_only and cfg.train.init_from)
    before = {
        "scaling_factor": model.config.scaling_factor,
        "shift_factor": model.config.shift_factor,
        "from": cfg.train.init_from or f"preset {cfg.model.preset}",
    }
    model.config, factor_note = shipped_factors(model.config, stats, encoder_trained)
    stats["factor_source"] = factor_note
    stats["factors_before"] = before
    with torch.no_grad():
        fp16 = fp16_decode_report(model, model.encode(to_model_range(next(iter(loader)))).mode())
    model.config = guarded_config(model.config, fp16)
    scores = json.loads(Path("metrics/eval.json").read_text())
    sources = {s: json.loads(Path(f"data/raw/{s}/source.json").read_text()) for s in ("train", "eval")}
    licenses = sorted({p.name for s in ("train", "eval") for p in Path(f"data/raw/{s}/licenses").glob("*")})
    client, run_id = training_run()
    card = render_model_card(
        model,
        single_file=f"{x.model_name}.safetensors" if x.single_file else None,
        params=cfg.to_dict(),
        sources=sources,
        licenses=licenses,
        scores=scores,
        stats=stats,
        fp16=fp16,
        run_id=run_id,
        run_tags=client.get_run(run_id).data.tags,
    )
    single_name = f"{x.model_name}.safetensors" if x.single_file else None
    if single_name:
        try:
            check_dtype(model, x.single_file_dtype, fp16)  # fp16 refused where the decode check overflowed
        except ConversionError as exc:
            raise SystemExit(f"export.single_file_dtype: {exc}") from exc
    source = {
        "mlflow_run_id": run_id,
        **{k: v for k, v in client.get_run(run_id).data.tags.items() if k.startswith("dvc.")},
    }
    out = save_diffusers(
        model,
        x.dir,
        extra_files={"README.md": card},
        also=(lambda d: save_ldm(model, d / single_name, dtype=x.single_file_dtype, source=source))
        if single_name
        else None,
    )
    for s in ("train", "eval"):
        for lic in Path(f"data/raw/{s}/licenses").glob("*"):
            (out / "licenses").mkdir(exist_ok=True)
            shutil.copy(lic, out / "licenses" / lic.name)
    result = {
        "dir": str(out),
        "scaling_factor": model.config.scaling_factor,
        "shift_factor": model.config.shift_factor,
        "scaling_factor_source": factor_note,
        "factors_before": before,
        "force_upcast": model.config.force_upcast,
        "single_file": None
        if single_name is None
        else {
            "path": str(out / single_name),
            "dtype": x.single_file_dtype,
            "bytes": (out / single_name).stat().st_size,
            "layout": "LDM (bare keys)",
        },
        "fp16_decode": fp16,
        "latent_stats": stats,
    }
    if x.register_model:
        result["registered_version"] = register_folder(client, run_id, out, "vae", x.model_name)
        result["registered_name"] = x.model_name
    write_json("metrics/export.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
