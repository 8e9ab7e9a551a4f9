"""The five phases of bench/gpu/gpu_check.py. Each takes the shared context, a `record(key, value)`
that saves a sub-result the moment it exists, and the wall-clock deadline of its time cap."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import io
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer

from gpu_correctness import check_gradients
from train_step import VARIANTS, bench_train_step, counted_flops, make_step, twin_models

Record = Callable[[str, Any], None]
GIB = 2**30
MEMORY_CAP_GIB = 8.0
# NVIDIA's published dense (no sparsity) BF16 tensor-core peaks, by a substring of the device name
SPEC_BF16_DENSE = (("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100", 989.4e12), ("A100", 312.0e12))


@dataclass
class Context:
    device: torch.device
    smoke: bool
    bundle: Path
    out: Path
    scratch: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gpu_check-")))
    spec_peak: float | None = None
    lpips: torch.nn.Module | None = None
    rates: dict[str, float] = field(default_factory=dict)  # measured step images/s, by variant
    trained: dict[str, Path] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def weights(self) -> Any:
        from sdvae.config import WeightsConfig

        vgg = self.bundle / "weights" / "lpips_vgg16_fp16.safetensors"
        return WeightsConfig(lpips_vgg=str(vgg) if vgg.is_file() else None)

    def lpips_net(self) -> torch.nn.Module:
        if self.lpips is None:
            from sdvae.metrics import build_lpips

            self.lpips = build_lpips(self.weights())
        return self.lpips

    def photos(self) -> tuple[Path, Path]:
        """(train, eval) folders: the bundle's, else scikit-image's photos (the smoke run in CI)."""
        train, evals = self.bundle / "photos" / "train", self.bundle / "photos" / "eval"
        if train.is_dir() and evals.is_dir():
            return train, evals
        from PIL import Image

        from sdvae.data.sources import SKIMAGE_PHOTOS, skimage_photo

        train, evals = self.scratch / "photos" / "train", self.scratch / "photos" / "eval"
        for folder in (train, evals):
            folder.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(SKIMAGE_PHOTOS):
            img = Image.fromarray(skimage_photo(name))
            img.save((evals if i % 3 == 2 else train) / f"{name}.jpg", quality=95)
        return train, evals


class _Tee(io.TextIOBase):
    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, s: str) -> int:
        for stream in self.streams:
            stream.write(s)
            stream.flush()
        return len(s)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def tee(path: Path) -> Iterator[None]:
    """stdout and stderr also into `path`, line by line (a killed run keeps its log)."""
    with path.open("a") as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err


def _sync(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)


# -- 1. environment --------------------------------------------------------------------------------------
def environment(ctx: Context, record: Record, deadline: float) -> None:
    import lightning

    machine: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda": torch.version.cuda,
    }
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        machine.update(
            device_name=props.name,
            memory_gib=round(props.total_memory / GIB, 1),
            capability=list(torch.cuda.get_device_capability(ctx.device)),
        )
        ctx.spec_peak = next((peak for key, peak in SPEC_BF16_DENSE if key in props.name), None)
    else:
        machine["device_name"] = platform.processor() or "cpu"
    record("machine", machine)
    n = 256 if ctx.smoke else 8192
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(ctx)
    reps = 3 if ctx.smoke else 50
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(ctx)
    seconds = (time.perf_counter() - t) / reps
    record(
        "matmul",
        {
            "size": n,
            "dtype": "bfloat16",
            "measured_tflops": 2 * n**3 / seconds / 1e12,
            "spec_dense_bf16_tflops": ctx.spec_peak / 1e12 if ctx.spec_peak else None,
            "spec_source": "NVIDIA datasheet, dense BF16 tensor core (the MFU denominator)",
        },
    )


# -- 2. correctness --------------------------------------------------------------------------------------
def correctness(ctx: Context, record: Record, deadline: float) -> None:
    from sdvae.training.compiling import CompileUnsupported, check_compile_supported

    if ctx.smoke:  # one compiled precision (a CPU compile takes a minute), in the graph of
        # tests/test_losses.py's compile test, so each reuses the other's cached kernels
        preset, res, batch, over = "tiny", 32, 2, {"block_out_channels": (16, 32), "norm_num_groups": 8}
        compiled: tuple[str, ...] = ("fp32",)
    else:
        # SD's block types, norms and attention with fewer layers: the same kernels, a shorter compile
        preset, res, batch = "sd-f8c4", 128, 2
        over = {"block_out_channels": (64, 128, 256, 256), "layers_per_block": 1}
        compiled = ("bf16", "fp32")
    try:
        check_compile_supported(ctx.cuda)
    except CompileUnsupported as exc:
        record("compile", f"not checked: {exc}")
        compiled = ()
    result = check_gradients(preset, res, batch, ctx.device, copy.deepcopy(ctx.lpips_net()), compiled, **over)
    for key, value in result.items():
        record(key, value)
    if not result["passed"]:
        raise AssertionError("a gradient check failed: see the entries with passed = false")


# -- 3. step ---------------------------------------------------------------------------------------------
def step(ctx: Context, record: Record, deadline: float) -> None:
    lpips_net = ctx.lpips_net()
    if ctx.smoke:
        preset, res, batches, repeats, variants = "tiny", 32, (2,), 1, ("diffusers", "ours_one_backward")
    else:
        preset, res, batches, repeats, variants = "sd-f8c4", 256, (8, 16), 5, VARIANTS
    dtype = torch.bfloat16
    ours, theirs = twin_models(preset)
    flops = {
        "diffusers": _flops_per_image(ctx, theirs, True, res),
        "ours_one_backward": _flops_per_image(ctx, ours, False, res),
    }
    del ours, theirs
    record("flops_per_image", flops)
    for batch in batches:
        # a shape seen before makes dynamo recompile with a dynamic batch: every size starts clean
        torch._dynamo.reset()
        rows = bench_train_step(preset, lpips_net, batch, res, repeats, ctx.device, dtype, variants=variants)
        for name in variants:
            algo = "diffusers" if name in ("diffusers", "ours_reference", "diffusers_compiled") else "ours_one_backward"
            rate = rows[f"{name}_images_per_s"]
            ctx.rates[f"{name}@{batch}"] = rate
            ctx.rates[f"{name}_warmup_s@{batch}"] = rows[f"{name}_warmup_s"]
            rows[f"{name}_mfu"] = rate * flops[algo] / ctx.spec_peak if ctx.spec_peak else None
        record(f"batch_{batch}", rows)
        _free(ctx)
    if not ctx.cuda:
        record("memory", "CUDA peak memory only; not measured on CPU")
        return
    memory: dict[str, Any] = {
        "preset": preset,
        "resolution": res,
        "dtype": "bfloat16",
        "variant": "ours_one_backward",
        "measure": "torch.cuda.max_memory_allocated over two steps (tensors; CUDA context and cache slack on top)",
    }
    for checkpointing in (False, True):
        memory[f"peak_gib_batch_8_checkpointing_{checkpointing}"] = _peak_gib(ctx, preset, res, 8, checkpointing)
        record("memory", memory)
    largest = None
    for batch in (8, 12, 16, 24, 32, 48):
        peak = _peak_gib(ctx, preset, res, batch, True)
        memory[f"peak_gib_batch_{batch}_checkpointing_True"] = peak
        if peak is None or peak > MEMORY_CAP_GIB:
            break
        largest = batch
    memory["largest_batch_checkpointing_within_8_gib"] = largest
    record("memory", memory)


def _flops_per_image(ctx: Context, ae: torch.nn.Module, is_diffusers: bool, res: int, gan: bool = True) -> float:
    """Counted FLOPs per image of one bf16 training step (train_step.make_step) of a copy of `ae`."""
    x = (torch.rand(2, 3, res, res) * 2 - 1).to(ctx.device)
    model = copy.deepcopy(ae).to(ctx.device).train()
    lpips_net = copy.deepcopy(ctx.lpips_net()).to(ctx.device)
    fn, _ = make_step(
        model, is_diffusers, lpips_net, x, one_backward=not is_diffusers, gan=gan, autocast_dtype=torch.bfloat16
    )
    flops = counted_flops(fn) / 2
    del model, lpips_net, fn
    _free(ctx)
    return flops


def _free(ctx: Context) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def _peak_gib(ctx: Context, preset: str, res: int, batch: int, checkpointing: bool) -> float | None:
    """Peak allocated GiB over two steps of ours (one backward, bf16), None on out-of-memory."""
    from sdvae.models import AutoencoderKL

    _free(ctx)
    torch.cuda.reset_peak_memory_stats(ctx.device)
    try:
        ae = AutoencoderKL.from_preset(preset).to(ctx.device).train()
        ae.enable_gradient_checkpointing(checkpointing)
        x = (torch.rand(batch, 3, res, res) * 2 - 1).to(ctx.device)
        fn, _ = make_step(
            ae,
            False,
            copy.deepcopy(ctx.lpips_net()).to(ctx.device),
            x,
            one_backward=True,
            autocast_dtype=torch.bfloat16,
        )
        fn()
        fn()
        _sync(ctx)
        return torch.cuda.max_memory_allocated(ctx.device) / GIB
    except torch.OutOfMemoryError:
        return None
    finally:
        ae = x = fn = None
        _free(ctx)


# -- 4. trainer ------------------------------------------------------------------------------------------
class StepClock(L.Callback):
    """Per batch: seconds waiting for the loader (end of one step to start of the next) and in the step."""

    def __init__(self, sync: bool) -> None:
        self.sync, self.rows, self._end, self._start = sync, [], None, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()
        self._wait = 0.0 if self._end is None else self._start - self._end

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self._end = time.perf_counter()
        self.rows.append({"wait": self._wait, "step": self._end - self._start, "gan": pl_module.gan_active})


def _segment(rows: list[dict], batch: int, skip: int, flops: float, peak: float | None) -> dict[str, Any] | None:
    """Throughput of a run of steps after its first `skip` (compilation, warm-up)."""
    rows = rows[skip:]
    if not rows:
        return None
    wait, busy = sum(r["wait"] for r in rows), sum(r["step"] for r in rows)
    rate = batch * len(rows) / (wait + busy)
    return {
        "steps": len(rows),
        "images_per_s": rate,
        "loader_wait_fraction": wait / (wait + busy),
        "flops_per_image": flops,
        "mfu": rate * flops / peak if peak else None,
    }


def trainer(ctx: Context, record: Record, deadline: float) -> None:
    from sdvae.config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig
    from sdvae.data.datamodule import ImageDataModule
    from sdvae.data.prepare import PrepareSpec, prepare_split
    from sdvae.formats.diffusers import save_diffusers
    from sdvae.models.factory import build_autoencoder
    from sdvae.training.module import VAEGANModule
    from sdvae.training.trainer import build_trainer

    smoke = ctx.smoke
    preset, res, batch = ("tiny", 32, 4) if smoke else ("sd-f8c4", 256, 16)
    workers = 0 if smoke else max(1, min(8, (os.cpu_count() or 2) - 2))
    train_dir, eval_dir = ctx.photos()
    t = time.perf_counter()
    caches = ctx.scratch / "caches"
    spec = PrepareSpec(
        "train", res, 16, 10**9, max_short_side=288, samples_per_image=4, num_workers=os.cpu_count() or 1
    )
    prepare_split(train_dir, caches / "train", spec)
    prepare_split(eval_dir, caches / "eval", dataclasses.replace(spec, mode="eval", samples_per_image=1))
    record("prepare_s", time.perf_counter() - t)
    model = build_autoencoder(ModelConfig(preset=preset), res)
    flops = {gan: _flops_per_image(ctx, model, False, res, gan=gan) for gan in (False, True)}
    del model
    _free(ctx)
    train_s = deadline - time.perf_counter() - (5 if smoke else 25)  # room to save the model
    rate = ctx.rates.get(f"ours_compiled@{batch}") or ctx.rates.get(f"ours_one_backward@{batch}") or 50.0
    # compiling happens inside the timed run: once at the start, again when the GAN joins
    compile_s = 1.5 * ctx.rates.get(f"ours_compiled_warmup_s@{batch}", 60.0)
    steps = 6 if smoke else max(40, int(rate * max(train_s - compile_s, 30.0) / batch))
    cfg = Config(
        data=DataConfig(train_short_side=(res, 288)),
        model=ModelConfig(preset=preset),
        loss=LossConfig(disc_start=int(0.6 * steps)),
        train=TrainConfig(
            resolution=res,
            batch_size=batch,
            max_steps=steps,
            precision="bf16-mixed" if ctx.cuda else "32",
            compile=not smoke,
            ema=True,
            accelerator="gpu" if ctx.cuda else "cpu",
            val_every=10**9,
            checkpoint_every=10**9,
            log_every=10,
            num_workers=workers,
        ),
        weights=ctx.weights(),
    )
    record(
        "config",
        {
            "preset": preset,
            "resolution": res,
            "batch": batch,
            "planned_steps": steps,
            "disc_start": cfg.loss.disc_start,
            "precision": cfg.train.precision,
            "compile": cfg.train.compile,
            "ema": True,
            "loader_workers": workers,
            "planned_from_images_per_s": rate,
            "planned_compile_s": compile_s,
            "timing": "host clock per batch, CUDA synchronised at each batch end; loader wait = end of one "
            "batch to the start of the next",
        },
    )
    torch._dynamo.reset()  # the trainer compiles as a fresh process would (static shapes)
    module = VAEGANModule(cfg, build_autoencoder(cfg.model, res), copy.deepcopy(ctx.lpips_net()))
    data = ImageDataModule(caches / "train", caches / "eval", batch, res, cfg.data.train_short_side, workers, 4, 0)
    clock = StepClock(sync=ctx.cuda)
    timer = Timer(duration=timedelta(seconds=max(5.0, train_s)), interval="step")
    fit = build_trainer(cfg, False, [clock, timer])
    fit.fit(module, datamodule=data)
    before = [r for r in clock.rows if not r["gan"]]
    after = [r for r in clock.rows if r["gan"]]
    skip = 1 if smoke else 10
    record("before_gan", _segment(before, batch, skip, flops[False], ctx.spec_peak))
    record("after_gan", _segment(after, batch, skip, flops[True], ctx.spec_peak))
    record("first_step_s", clock.rows[0]["step"] if clock.rows else None)
    record(
        "steps",
        {
            "windows": module.windows,
            "g_steps": module.g_steps,
            "d_steps": module.d_steps,
            "skipped": module.bad_steps,
            "stopped_by_timer": module.windows < steps,
        },
    )
    for name, model in (("trained", module.autoencoder), ("trained_ema", getattr(module.ema, "module", None))):
        if model is not None:
            save_diffusers(model, ctx.scratch / name)
            ctx.trained[name] = ctx.scratch / name
    record("losses", module.history[-1] if module.history else None)


# -- 5. evaluation ---------------------------------------------------------------------------------------
def evaluation(ctx: Context, record: Record, deadline: float) -> None:
    from sdvae.scoring.report import flat_metrics, save_grid
    from sdvae.scoring.run import ScoreOptions, score_models

    if not ctx.trained:
        raise RuntimeError("no trained model: the trainer phase did not finish")
    _, eval_dir = ctx.photos()
    options = ScoreOptions(
        resolution=32 if ctx.smoke else 256,
        batch_size=8,
        accelerator="gpu" if ctx.cuda else "cpu",
        workers=0 if ctx.smoke else 4,
        progress=False,
        inception=False,  # the Inception weights do not fit the device bundle (bench/gpu/gpu_bundle.py)
    )
    models = [*((label, str(path)) for label, path in ctx.trained.items()), ("bicubic", "bicubic")]
    result = score_models(models, f"folder:{eval_dir}", options, ctx.weights())
    assert result is not None
    save_grid(result, ctx.out / "eval_grid.png")
    record("images", result["images"])
    record("protocol", "per-image PSNR / SSIM / LPIPS (sdvae.scoring.protocol); no rFID / KID: no Inception")
    record("models", {label: flat_metrics(m) for label, m in result["models"].items()})
    record("images_per_s", result["images_per_s"])
    shutil.rmtree(ctx.scratch, ignore_errors=True)
