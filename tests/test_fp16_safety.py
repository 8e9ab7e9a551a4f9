"""An fp16 decode that overflows is reported and keeps `force_upcast: true`; one that does not is left alone."""

import pytest
import torch

from sdvae.fp16_safety import FP16_MAX, fp16_decode_report, guarded_config
from sdvae.models import AutoencoderKL
from tests.conftest import to_tensor


def _model_and_latents(photos):
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny", force_upcast=False).eval()
    x = torch.cat([to_tensor(p, 32) for p in photos[:2]])
    with torch.no_grad():
        return model, model.encode(x).mode()


@pytest.mark.cpu_paths
def test_a_decoder_within_fp16_range_decodes_in_fp16_and_keeps_its_config(photos):
    model, z = _model_and_latents(photos)
    report = fp16_decode_report(model, z)
    assert 0 < report["max_abs_activation"] < FP16_MAX
    assert report["fp16_nonfinite_outputs"] == 0 and not report["overflows_fp16"]
    assert report["fp16_max_abs_error"] < 0.05  # fp16 round-off on outputs in [-1, 1]
    assert guarded_config(model.config, report).force_upcast is False
    assert next(model.parameters()).dtype == torch.float32  # the report decodes a copy in fp16


@pytest.mark.cpu_paths
def test_an_overflowing_decoder_is_reported_where_it_overflows_and_gets_force_upcast(photos):
    model, z = _model_and_latents(photos)
    with torch.no_grad():  # SDXL-like: one layer's activations far past 65504
        model.decoder.conv_in.weight.mul_(1e6)
    report = fp16_decode_report(model, z)
    assert report["max_abs_activation"] > FP16_MAX
    assert report["max_abs_activation_at"].startswith("decoder.")  # at conv_in or a residual sum after it
    assert report["overflows_fp16"] and report["fp16_max_abs_error"] is None
    assert report["fp16_nonfinite_outputs"] > 0
    assert guarded_config(model.config, report).force_upcast is True
