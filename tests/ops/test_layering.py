"""Building blocks never import upward: ``schemas/`` imports nothing of ours, ``storage/`` only
``schemas/``, ``rewriter/`` never ``transforms/`` or ``pipelines/``, and ``mmcorpus_reader`` never Beam."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

PROJECT = {"schemas", "storage", "transforms", "rewriter", "pipelines", "mmcorpus_reader", "dags", "bench", "tests"}

# package -> top-level modules it must never import (at module level or inside a function)
FORBIDDEN = {
    "schemas": PROJECT - {"schemas"},
    "storage": PROJECT - {"schemas", "storage"},
    "rewriter": {"transforms", "pipelines", "dags", "bench", "tests"},
    "mmcorpus_reader": {"apache_beam", "transforms", "pipelines", "rewriter", "storage", "dags", "bench", "tests"},
}


def imported_modules(source: str) -> set[str]:
    """Top-level names of every module a source file imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.add(node.args[0].value.split(".")[0])
    return found


def violations() -> list[str]:
    bad = []
    for package, forbidden in sorted(FORBIDDEN.items()):
        files = sorted((REPO / package).rglob("*.py"))
        assert files, f"no sources found for {package}"
        for path in files:
            hits = imported_modules(path.read_text(encoding="utf-8")) & forbidden
            bad += [f"{path.relative_to(REPO)} imports {m}" for m in sorted(hits)]
    return bad


def test_the_checker_sees_function_level_and_dynamic_imports():
    src = "import os\ndef f():\n    from transforms.stage_io import join\n    import apache_beam.io as x\n" \
          "importlib.import_module('pipelines.runner')\nfrom . import sibling\n"
    assert imported_modules(src) == {"os", "transforms", "apache_beam", "pipelines"}


def test_no_package_imports_upward():
    assert violations() == []


def test_importing_the_reader_loads_no_beam():
    code = "import sys, mmcorpus_reader; print(sorted(m for m in sys.modules if m.split('.')[0] in " \
           "{'apache_beam', 'transforms', 'pipelines', 'rewriter', 'storage'}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_rewriter_seed_and_sft_load_without_transforms():
    code = "import sys, rewriter.seed, rewriter.sft; print(sorted(m for m in sys.modules if m.startswith('transforms')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
