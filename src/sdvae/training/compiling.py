"""`train.compile`: torch.compile of the networks in the training step, leaving their layout alone.

What is compiled: the encoder, the decoder up to (not including) `conv_out`, the discriminator
and LPIPS. `conv_out` stays eager on purpose: the adaptive GAN weight differentiates its weight,
and inside a compiled region that gradient would cost the whole decoder's compiled backward.
`nn.Module.compile` compiles in place, so state-dict keys (checkpoints, exports, EMA) are
unchanged. The EMA copy is not compiled: it only runs in validation.

On a CPU, inductor needs a vector instruction set (AVX2, AVX-512, NEON...): without one it
still emits vector code and fails with a C++ compile error deep inside the first step (seen
with `ATEN_CPU_CAPABILITY=default`), so `check_compile_supported` says so before any work.
"""

from __future__ import annotations

import torch
from torch import nn

from sdvae.models.autoencoder_kl import AutoencoderKL


class CompileUnsupported(RuntimeError):
    """train.compile cannot work on this machine; the message says why and what to do."""


def check_compile_supported(on_cuda: bool) -> None:
    if on_cuda:
        return
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    if not pick_vec_isa():
        raise CompileUnsupported(
            "train.compile: PyTorch's inductor has no vector instruction set to compile for on this CPU "
            "(none of AVX2 / AVX-512 / NEON usable, or ATEN_CPU_CAPABILITY=default); set train.compile: false"
        )


def compile_for_training(
    autoencoder: AutoencoderKL, discriminator: nn.Module, perceptual: nn.Module | None, mode: str
) -> None:
    autoencoder.encoder.compile(mode=mode)
    decoder = autoencoder.decoder
    decoder.trunk = torch.compile(decoder.trunk, mode=mode)  # type: ignore[method-assign]
    discriminator.compile(mode=mode)
    if perceptual is not None:
        perceptual.compile(mode=mode)
