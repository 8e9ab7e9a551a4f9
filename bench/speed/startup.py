"""What a pipeline process pays before it works: importing the evaluate stage's modules.

Every DVC stage, queued experiment and DDP rank is a fresh Python process. Where bytecode is not
cached (`PYTHONDONTWRITEBYTECODE=1`, read-only or fresh environments) each one compiles every
module it imports from source; `scripts/dev.sh` therefore installs with `uv sync
--compile-bytecode`. This times the same import in fresh processes with the installed bytecode
(`cached`) and with an empty bytecode prefix and writing off (`from_source`, the state before),
interleaved, and writes the `startup` entry of metrics/bench.json.

    python bench/speed/startup.py [--repeats 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / group) for group in ("common", "speed", "quality")
]  # bench/README.md

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import store_entry
from sdvae.training.timing_cache import machine_identity

ROOT = Path(__file__).resolve().parents[2]
IMPORTS = "import sdvae.scoring.run, sdvae.tracking, sdvae.formats, lightning"


def timed_import(env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORTS], env=env, check=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "metrics/bench.json"))
    args = parser.parse_args()
    cached_env = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
    times: dict[str, list[float]] = {"cached": [], "from_source": []}
    with tempfile.TemporaryDirectory() as empty:
        source_env = {**cached_env, "PYTHONPYCACHEPREFIX": empty, "PYTHONDONTWRITEBYTECODE": "1"}
        timed_import(cached_env)  # warm the page cache for both variants
        for _ in range(args.repeats):
            times["cached"].append(timed_import(cached_env))
            times["from_source"].append(timed_import(source_env))
    medians = {k: round(statistics.median(v), 2) for k, v in times.items()}
    entry = {
        "what": f"seconds to `{IMPORTS}` in a fresh process (median of {args.repeats}, interleaved)",
        "machine": {k: machine_identity()[k] for k in ("cpu", "cpu_family_model")} | {"cpus": os.cpu_count()},
        "cached_s": medians["cached"],
        "from_source_s": medians["from_source"],
        "ratio_from_source_over_cached": round(medians["from_source"] / medians["cached"], 2),
        "command": "python bench/speed/startup.py",
    }
    store_entry(args.out, "startup", entry)
    print(entry)


if __name__ == "__main__":
    main()
