"""The import graph runs one way: core vocabulary at the bottom, the CLI at the top, no arrow back up.

Each module of src/dynq belongs to a unit (a package under dynq, or a top-level module) and each unit to a layer. A
module may import its own unit and units of lower layers only; two units of one layer stay independent.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dynq"

LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"errors", "paths", "version"}),
    frozenset({"core", "executors"}),  # tensor info, dtypes, qtypes, sizes, importance, run context, source protocol;
    # where units of work run (this process, local processes, a Ray cluster)
    frozenset({"recipe", "kernels"}),  # choosing (pure functions of the inventory) and encoding
    frozenset({"gguf_io", "pypi"}),  # file formats; package downloads
    frozenset({"llamacpp"}),  # llama.cpp from the one pinned release: its runtime, tools and converter
    frozenset({"sources", "calib", "encode_cache"}),  # opening, fetching, collecting importance
    frozenset({"quantize", "inspect", "lab"}),  # streaming a plan; describing a file; test and bench models
    frozenset({"eval", "deploy", "runnable"}),  # judging, running and shipping quants; the GGUF a source runs as
    frozenset({"moe", "card", "budget"}),  # models built from models; model cards; the size budget (profile, solve)
    frozenset({"benchmark"}),  # recipes, llama.cpp mixes and solved mixes measured side by side
    frozenset({"api"}),
    frozenset({"__init__"}),  # the package's exports: the API
    frozenset({"cli"}),  # the `dynq` command, on the public API only (CLI_MAY_IMPORT)
    frozenset({"__main__"}),  # `python -m dynq`: the command
)
# What the CLI may import besides itself: the public API, the errors it words in flags, and core's vocabulary (units,
# the run context, the progress shape). Anything else it needs belongs in the API first.
CLI_MAY_IMPORT = ("dynq", "dynq.api", "dynq.errors", "dynq.core", "dynq.cli")
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        found[name] = path
    return found


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "dynq":  # `from dynq import api`: the modules named
            out |= {
                f"dynq.{a.name}" if (SRC / f"{a.name}.py").exists() or (SRC / a.name).is_dir() else "dynq"
                for a in node.names
            }
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dynq":
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "dynq"}
    return out


def test_every_unit_has_a_layer() -> None:
    units = {unit_of(m) for m in modules()}
    assert units - set(RANK) == set(), "place these in LAYERS"


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_import_runs_up_or_across(module: str) -> None:
    unit = unit_of(module)
    bad = []
    for target in imports(modules()[module]):
        other = unit_of(target) if target != "dynq" else "__init__"
        if other != unit and RANK[other] >= RANK[unit]:
            bad.append(f"{target} (layer {RANK[other]})")
    assert bad == [], f"{module} (layer {RANK[unit]}) imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in modules() if unit_of(m) == "cli"))
def test_the_cli_speaks_only_to_the_public_api(module: str) -> None:
    allowed = {m for m in modules() if any(m == a or m.startswith(a + ".") for a in CLI_MAY_IMPORT)} | {"dynq"}
    assert imports(modules()[module]) - allowed == set()


def test_only_the_api_and_the_cli_import_lab() -> None:
    """`lab` (models built for tests, benches and the demo) sits low enough for the API to re-export, but nothing a
    quantization runs through may need it."""
    users = {m for m, path in modules().items() if any(unit_of(t) == "lab" for t in imports(path))}
    allowed = {m for m in users if unit_of(m) in {"lab", "api", "__init__", "cli"}}
    assert users - allowed == set()


def test_the_check_catches_an_upward_arrow(tmp_path: Path) -> None:
    """The walker sees imports inside functions too, and a core module importing sources would be flagged."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from dynq.sources.open import open_source\n")
    assert imports(probe) == {"dynq.sources.open"}
    assert RANK[unit_of("dynq.sources.open")] > RANK[unit_of("dynq.core.tensors")]
