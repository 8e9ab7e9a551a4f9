"""What the CPU code path under test can do (see `scripts/dev.sh cpu-paths`)."""

from __future__ import annotations

import pytest


def _inductor_has_vector_isa() -> bool:
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return bool(pick_vec_isa())


# `train.compile` refuses such a CPU with a clear error (tested in test_training); its compiled
# paths can only be compared where inductor can build them.
needs_inductor_vector_isa = pytest.mark.skipif(
    not _inductor_has_vector_isa(),
    reason="inductor has no vector ISA on this CPU path (ATEN_CPU_CAPABILITY=default): train.compile is refused",
)
