"""MkDocs hooks: pages made from the project's own files at build time, never written by hand.

- `params.md`: the params reference (`sdvae.params_reference`: types from the config, text from
  params.yaml), so the docs cannot drift from what the config accepts.
- `bench-results.md`: every entry of `metrics/bench.json` as a table, with the command that wrote it.
- `metrics/*.png`: the plots and grids the benchmarks and the pipeline draw.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

from sdvae.params_reference import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
MAX_ROWS = 60  # a long entry (per-image rows) shows its first rows; the JSON holds them all


def _leaves(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{prefix}[{i}]")]
    return [(prefix, value)]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text.replace("|", "\\|")


def bench_markdown(bench_json: Path) -> str:
    data = json.loads(bench_json.read_text())
    lines = [
        "# Benchmark results",
        "",
        "Every entry of `metrics/bench.json`, generated at build time. Each names the command that wrote",
        "it and, where it timed anything, the machine. The [benchmarks page](benchmarks.md) reads them.",
    ]
    for name in sorted(data):
        entry = data[name]
        lines += ["", f"## `{name}`", ""]
        for key in ("what", "command", "machine"):
            if key in entry:
                lines.append(f"- **{key}**: {_fmt(entry[key])}")
        rows = [(k, v) for k, v in _leaves(entry) if k.split(".")[0] not in ("what", "command", "machine")]
        lines += ["", "| figure | value |", "|---|---|"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in rows[:MAX_ROWS]]
        if len(rows) > MAX_ROWS:
            lines.append(f"| ... | {len(rows) - MAX_ROWS} more in `metrics/bench.json` |")
    return "\n".join(lines) + "\n"


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, "params.md", content=reference_markdown(ROOT / "params.yaml")))
    files.append(File.generated(config, "bench-results.md", content=bench_markdown(ROOT / "metrics/bench.json")))
    for png in sorted((ROOT / "metrics").glob("*.png")):
        files.append(File.generated(config, f"metrics/{png.name}", abs_src_path=str(png)))
    return files
