"""The documentation: the params reference is generated and complete, the README stays short, and
every command the README and the getting-started page show is one that works."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from sdvae.config import config_from_dict, load_config
from sdvae.params_reference import _cell, param_docs, reference_markdown

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = [ROOT / "README.md", ROOT / "docs/getting-started.md", ROOT / "docs/training.md"]


def test_every_param_the_config_accepts_has_its_text_in_params_yaml():
    docs = param_docs(ROOT / "params.yaml")
    missing = [d.key for d in docs if not d.text]
    assert not missing, f"params without a comment in params.yaml: {missing}"
    assert {d.key for d in docs} == set(load_config(ROOT / "params.yaml").flat())


def test_the_reference_page_lists_each_key_with_its_text_and_what_it_accepts():
    page = reference_markdown(ROOT / "params.yaml")
    sections = page.split("\n## ")[1:]
    for doc in param_docs(ROOT / "params.yaml"):
        section, name = doc.key.split(".", 1)
        table = next(s for s in sections if s.startswith(f"`{section}`"))
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
        assert _cell(doc.text) in row and _cell(doc.kind) in row
    assert "one of 'auto', 'ddp'" in page  # the config's Literal, not a copy of it


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def _dvc_exp_commands() -> list[tuple[Path, list[str]]]:
    found = []
    for page in DOCUMENTED:
        for line in page.read_text().splitlines():
            if "dvc exp run" in line and " -S " in line:
                cmd = line[line.index("dvc exp run") :].split("`")[0].split("#")[0]
                found.append((page, shlex.split(cmd)))
    return found


@pytest.mark.parametrize(("page", "argv"), _dvc_exp_commands(), ids=lambda v: v.name if isinstance(v, Path) else "")
def test_every_documented_experiment_sets_keys_and_values_the_config_accepts(page, argv):
    """`dvc exp run -S k=v` writes into params.yaml; here the same overrides go through the config's
    validation, so a renamed key or a refused value in the docs fails."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "-S"]
    assert sets
    for assignment in sets:
        key, value = assignment.split("=", 1)
        section, name = key.split(".")
        params[section][name] = yaml.safe_load(value)
    if params["train"].get("init_from"):  # a file the reader has; its architecture comes from it
        params["train"]["init_from"] = None
    config_from_dict(params)


def test_the_getting_started_python_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs/getting-started.md").read_text()
    code = re.search(r"```python\n(.*?)```", text.split("## Python API", 1)[1], re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "getting-started.md", "exec"), {})
    assert (tmp_path / "my-vae" / "config.json").is_file()
