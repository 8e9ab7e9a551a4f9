"""The params reference: every key the config accepts, from the code (type, bounds, the library's
default) and the text beside it in `params.yaml` (its meaning and the embedded default's value).

Why one generator: the meaning of a param was written three times (params.yaml, config.py, the
README) and could drift. Now `params.yaml` holds the one text per key, the config holds types and
bounds, and the docs page is made from both; a test fails when a key has no text.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from pathlib import Path

from sdvae.config import Config, _bounds_text, _describe

_SECTION = re.compile(r"^([a-z_]+):\s*(?:#.*)?$")
_KEY = re.compile(r"^  ([a-z_0-9]+):\s*(.*?)\s*(?:#\s*(.*))?$")


@dataclass(frozen=True)
class ParamDoc:
    key: str  # section.name
    kind: str  # what the config accepts
    library_default: object
    project_value: str | None  # as written in params.yaml (None: not listed there)
    text: str  # the params.yaml comment ("" when missing)


def yaml_comments(params_yaml: Path) -> dict[str, tuple[str, str]]:
    """`section.key -> (value as written, comment)` from params.yaml's own lines."""
    out: dict[str, tuple[str, str]] = {}
    section = None
    for line in params_yaml.read_text().splitlines():
        if m := _SECTION.match(line):
            section = m.group(1)
        elif section and (m := _KEY.match(line)):
            out[f"{section}.{m.group(1)}"] = (m.group(2), (m.group(3) or "").strip())
    return out


def param_docs(params_yaml: Path) -> list[ParamDoc]:
    written = yaml_comments(params_yaml)
    docs = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            key = f"{section.name}.{f.name}"
            kind = _describe(hints[f.name])
            bounds = _bounds_text(dict(f.metadata))
            value, text = written.get(key, (None, ""))
            docs.append(
                ParamDoc(key, f"{kind}{', ' + bounds if bounds else ''}", getattr(defaults, f.name), value, text)
            )
    return docs


def _cell(text: object) -> str:
    """Table-safe: pipes escaped, angle brackets as entities (`folder:<path>` is no HTML tag)."""
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def reference_markdown(params_yaml: Path) -> str:
    """The docs page: one table per section."""
    lines = [
        "# Params reference",
        "",
        "Generated from `sdvae.config` (types, bounds) and the comments in `params.yaml` (meaning, the",
        "embedded CPU default): edit those, not this page. `sdvae info` prints the validated, resolved",
        "view of your `params.yaml`; `dvc exp run -S section.key=value` tries a variant. A bad value is",
        "refused before any work, naming the key and what it accepts.",
    ]
    section = None
    for doc in param_docs(params_yaml):
        name = doc.key.split(".")[0]
        if name != section:
            section = name
            header = f"| `{name}.` key | meaning | params.yaml | accepts |"
            lines += ["", f"## `{name}`", "", header, "|---|---|---|---|"]
        value = f"`{_cell(doc.project_value)}`" if doc.project_value is not None else "(library default)"
        lines.append(f"| `{doc.key.split('.', 1)[1]}` | {_cell(doc.text)} | {value} | {_cell(doc.kind)} |")
    return "\n".join(lines) + "\n"
