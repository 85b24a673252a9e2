"""Tables the CLI draws (rich). Library modules never import this."""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Console
from rich.table import Table
from rich.text import Text

from dynq import api
from dynq.cli.text import data, line
from dynq.core.importance import Imatrix
from dynq.core.sizes import ClassStats
from dynq.core.tensors import TensorClass
from dynq.core.units import GIB, MIB


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape)


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / MIB:.2f} MiB"


def class_table(classes: Mapping[TensorClass, ClassStats], total_bytes: int, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("class", "tensors", "params", "size", "share", "bpw"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for cls, s in classes.items():
        share = 100.0 * s.nbytes / total_bytes if total_bytes else 0.0
        table.add_row(data(cls.value), str(s.n_tensors), f"{s.n_elements / 1e9:.3f} B", _size(s.nbytes),
                      f"{share:.1f}%", f"{s.bpw:.3f}")  # fmt: skip
    return table


def census_table(counts: Mapping[str, int], nbytes: Mapping[str, int], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("type", "tensors", "size"):
        table.add_column(col, justify="left" if col == "type" else "right")
    for name, n in counts.items():
        table.add_row(data(name), str(n), _size(nbytes[name]))
    return table


def draw_plan(console: Console, plan: api.QuantPlan, coverage: list[api.TensorCoverage] | None, tensors: bool) -> None:
    if tensors:
        cov = {c.name: c for c in coverage or []}
        table = Table(title=line("plan: ", data(plan.recipe.name), " on ", data(plan.source)), title_justify="left")
        for col in ("tensor", "shape", "type", "size"):
            table.add_column(col, justify="right" if col == "size" else "left", no_wrap=True)
        table.add_column("reason", overflow="fold")
        if coverage is not None:
            table.add_column("imatrix")
        for t in plan.tensors:
            name = data(t.info.name)
            row: list[str | Text] = [name, _shape(t.info.shape), t.qtype.name, _size(t.nbytes), data(t.reason)]
            if coverage is not None:
                row.append(data(cov[t.info.name].label() if t.info.name in cov else ""))
            table.add_row(*row)
        console.print(table)
    type_bytes: dict[str, int] = {}
    for t in plan.tensors:
        type_bytes[t.qtype.name] = type_bytes.get(t.qtype.name, 0) + t.nbytes
    console.print(census_table(plan.census, type_bytes, "types"))
    console.print(class_table(plan.by_class(), plan.total_bytes, "per tensor class"))
    console.print(
        line(data(plan.recipe.name, "bold"), " on ", data(plan.source),
             f": {len(plan.tensors)} tensors, {plan.n_elements / 1e9:.3f} B parameters, ",
             data(f"{plan.total_bytes / GIB:.2f} GiB", "bold"), f" ({plan.total_bytes:,} bytes), ",
             data(f"{plan.bpw:.3f} bpw", "bold"))
    )  # fmt: skip
    needing = plan.needing_imatrix()
    if needing:
        console.print(line(f"{len(needing)} tensors need an importance matrix (llama.cpp refuses them without one)"))


def draw_summary(console: Console, s: api.FileSummary) -> None:
    files = f"{len(s.shards)} file{'s' if len(s.shards) > 1 else ''}"
    console.print(line(data(s.path, "bold"), f" ({files}, {s.file_bytes:,} bytes)"))
    meta = Table(title="metadata", title_justify="left", show_header=False)
    meta.add_column("key")
    meta.add_column("value")
    for k, v in s.metadata.items():
        text = str(v)
        meta.add_row(data(k), data(text if len(text) < 200 else text[:197] + "..."))
    console.print(meta)
    console.print(census_table(s.type_counts, s.type_bytes, "types"))
    console.print(class_table(s.classes, s.total_bytes, "per tensor class"))
    console.print(
        line(f"{s.n_tensors} tensors, {s.n_parameters / 1e9:.3f} B parameters, ",
             data(f"{s.total_bytes / GIB:.3f} GiB", "bold"), " of tensor data, ", data(f"{s.bpw:.3f} bpw", "bold"))
    )  # fmt: skip


_SHORT = {TensorClass.ROUTED_EXPERTS: "experts", TensorClass.SHARED_EXPERTS: "shexp", TensorClass.ATTENTION: "attn",
          TensorClass.DENSE_FFN: "ffn", TensorClass.EMBEDDINGS: "embd", TensorClass.OUTPUT: "output",
          TensorClass.OTHER: "other"}  # fmt: skip


def draw_comparison(console: Console, plans: list[api.QuantPlan]) -> None:
    classes = [c for c in TensorClass if c is not TensorClass.OTHER and any(c in p.by_class() for p in plans)]
    title = line("recipes on ", data(plans[0].source), " (bpw per tensor class)") if plans else line("recipes")
    table = Table(title=title, title_justify="left")
    table.add_column("recipe", no_wrap=True)
    for col in ("size", "bpw", *[_SHORT[c] for c in classes], "imatrix"):
        table.add_column(col, justify="right", no_wrap=True)
    for p in plans:
        stats = p.by_class()
        cells = [f"{stats[c].bpw:.2f}" if c in stats else "" for c in classes]
        need = "needed" if p.needing_imatrix() else "-"
        table.add_row(data(p.recipe.name), _size(p.total_bytes), f"{p.bpw:.3f}", *cells, need)
    console.print(table)


def draw_imatrix_coverage(console: Console, imx: Imatrix, full: bool) -> None:
    """Tokens per tensor, and for expert tensors how many experts got none (every tensor if `full`)."""
    table = Table(title="imatrix coverage", title_justify="left")
    for col in ("tensor", "matrices", "tokens (min)", "tokens (max)", "without data"):
        table.add_column(col, justify="left" if col == "tensor" else "right")
    starved = 0
    for name, e in imx.entries.items():
        empty = int((e.counts <= 0).sum())
        starved += empty
        if full or empty or e.n_mat > 1:
            table.add_row(data(name), str(e.n_mat), f"{e.counts.min():.0f}", f"{e.counts.max():.0f}", str(empty))
    if table.row_count:
        console.print(table)
    experts = sum(e.n_mat for e in imx.entries.values() if e.n_mat > 1)
    console.print(line(f"{len(imx.entries)} tensors; {experts} expert matrices, {starved} of them without data"))
