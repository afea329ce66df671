"""Repository layout and import direction: mz_kernels <- mz_backbones <- mz_pipelines <- mz_apps."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"kernels": "mz_kernels", "backbones": "mz_backbones", "pipelines": "mz_pipelines", "apps": "mz_apps"}
# what each package must never import (heavy optional libraries are imported at the edge, not by the kernels)
FORBIDDEN = {
    "mz_kernels": {"mz_backbones", "mz_pipelines", "mz_apps", "gradio", "monai", "mne", "mmseg", "mmcv", "mmengine"},
    "mz_backbones": {"mz_pipelines", "mz_apps", "gradio"},
    "mz_pipelines": {"mz_apps"},
    "mz_apps": set(),
}
DOMAINS = ("medseg", "eeg", "audio", "tracking", "motion")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", list(PACKAGES))
def test_top_level_folders_are_not_packages(folder):
    assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py must not exist (it could shadow PyPI's '{folder}')"
    assert (ROOT / folder / PACKAGES[folder] / "__init__.py").is_file()


@pytest.mark.parametrize("folder", list(PACKAGES))
def test_packages_import_from_this_checkout(folder):
    mod = importlib.import_module(PACKAGES[folder])
    assert Path(mod.__file__).resolve().is_relative_to(ROOT / folder), mod.__file__


@pytest.mark.parametrize("folder", list(PACKAGES))
def test_import_direction(folder):
    pkg = PACKAGES[folder]
    bad = []
    for path in sorted((ROOT / folder / pkg).rglob("*.py")):
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top in FORBIDDEN[pkg]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
            # domain pipelines never import each other
            parts = path.relative_to(ROOT / folder / pkg).parts
            if pkg == "mz_pipelines" and parts[0] in DOMAINS and top == "mz_pipelines":
                other = name.split(".")[1] if "." in name else ""
                if other in DOMAINS and other != parts[0]:
                    bad.append(f"{path.relative_to(ROOT)} imports another domain: {name}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_layering_check_catches_a_violation(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import os\nfrom mz_pipelines.cli import main\nimport gradio as gr\n")
    assert {"mz_pipelines.cli", "gradio"} <= imported_modules(f)
