import pytest

from sdvae.training.precision import cpu_flags, resolve_precision


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\nbugs\t\t: none\n")
    assert cpu_flags(info) == {"fpu", "sse", "avx2", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx512f", "avx512_bf16"}, "bf16-mixed"),
        ({"amx_tile", "amx_bf16"}, "bf16-mixed"),
        ({"avx512f"}, "32"),
        (set(), "32"),
    ],
)
def test_auto_on_cpu_uses_bf16_only_where_it_is_native(flags, expected):
    assert resolve_precision("auto", "cpu", flags) == expected


@pytest.mark.parametrize("requested", ["32", "bf16-mixed", "16-mixed"])
def test_an_explicit_precision_is_kept(requested):
    assert resolve_precision(requested, "cpu", {"avx512_bf16"}) == requested
    assert resolve_precision(requested, "gpu", set()) == requested


def test_auto_keeps_fp32_on_other_accelerators():
    assert resolve_precision("auto", "mps", {"avx512_bf16"}) == "32"
