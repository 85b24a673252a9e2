"""What building zoo:qwen2.5-coder-1.5b-moe measured: router recall per block, perplexity against experts per token,
and the expert layouts side by side (co-activation clusters against contiguous index runs).

    .venv/bin/python bench/moe_build.py [--layout contiguous ...] [--render]

Builds (or reads from the cache) the zoo model with the default co-activation layout, builds the same model with
each `--layout` given into a scratch folder, and writes bench/results/qwen2.5-coder-1.5b-moe-build.{md,json,png}.
Everything here is measured on calibration text (the router is fitted on its first chunks, recall is measured on
the others); the evaluation text stays unseen.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import dynq
from dynq.calib.text import calibration_text
from dynq.moe.build import MoeSettings, build_moe
from dynq.sources import zoo

RESULTS = Path(__file__).parent / "results"
NAME = "qwen2.5-coder-1.5b-moe"


def _plot(reports: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    curve, recall = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for layout, r in reports.items():
        ks = sorted(int(k) for k in r["ppl"])
        curve.plot(ks, [r["ppl"][str(k)] for k in ks], marker="o", label=f"{layout} layout")
        k = sorted(int(k) for k in r["blocks"][0]["recall"])[len(r["blocks"][0]["recall"]) // 2]
        recall.plot([b["block"] for b in r["blocks"]], [b["recall"][str(k)] for b in r["blocks"]], marker=".",
                    label=f"{layout}, top-{k}")  # fmt: skip
    dense = next(iter(reports.values()))["dense_ppl"]
    limit = next(iter(reports.values()))["settings"]["max_ppl_ratio"]
    curve.axhline(dense, color="grey", linewidth=0.8, label="dense model")
    curve.axhline(dense * limit, color="grey", linestyle="--", linewidth=0.8, label=f"{limit}x dense")
    curve.set(xscale="log", yscale="log", xlabel="experts per token (of 32)", ylabel="perplexity, calibration text",
              title="experts per token")  # fmt: skip
    curve.legend()
    recall.set(xlabel="block", ylabel="router recall of the oracle's top-k", ylim=(0, 1), title="router recall")
    recall.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def report(reports: Mapping[str, Mapping[str, Any]]) -> str:
    main = reports["coactivation"]
    s = main["settings"]
    ks = sorted(int(k) for k in main["ppl"])
    lines = [
        f"# zoo:{NAME}: the dense model re-laid as experts",
        "",
        f"Per block: {s['n_shared']} shared neurons + {s['n_expert']} routed experts of "
        f"{(8960 - s['n_shared']) // s['n_expert']}; routed experts hold {main['expert_share']:.1%} of the weights. "
        f"Calibration text, {s['chunks']} chunks of {s['n_ctx']} tokens: the router is fitted on the first "
        f"{s['fit_chunks']}, recall measured on the other {s['chunks'] - s['fit_chunks']}; perplexity on "
        f"{s['curve_chunks']} chunks. Dense perplexity {main['dense_ppl']:.3f}; the file's experts per token: "
        f"**{main['experts_used']}** (the smallest within {s['max_ppl_ratio']}x of dense).",
        "",
        "| layout | " + " | ".join(f"PPL k={k}" for k in ks) + " | k chosen | mean recall (k chosen) |",
        "|---|" + "---:|" * (len(ks) + 2),
    ]
    for layout, r in reports.items():
        k = r["experts_used"]
        rec = [b["recall"].get(str(k)) for b in r["blocks"]]
        mean_recall = f"{np.mean(rec):.3f}" if all(x is not None for x in rec) else "-"
        ppl = " | ".join(f"{r['ppl'][str(k_)]:.3f}" for k_ in ks)
        lines.append(f"| {layout} | {ppl} | {k} | {mean_recall} |")
    rk = sorted(int(k) for k in main["blocks"][0]["recall"])
    lines += [
        "",
        "Router recall of the oracle's choice (the experts with the largest outputs), held-out calibration chunks, "
        f"co-activation layout (a random choice recalls k/{s['n_expert']} on average):",
        "",
        "| block | shared share of the FFN output | " + " | ".join(f"top-{k}" for k in rk) + " |",
        "|---:|---:|" + "---:|" * len(rk),
    ]
    for b in main["blocks"]:
        lines.append(f"| {b['block']} | {b['shared_share']:.3f} | "
                     + " | ".join(f"{b['recall'][str(k)]:.3f}" for k in rk) + " |")  # fmt: skip
    lines += ["", "Build time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in main["seconds"].items()), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", action="append", default=[], help="another layout to build and compare")
    ap.add_argument("--render", action="store_true", help="only redraw the table and plot from the JSON")
    args = ap.parse_args(argv)
    out_json = RESULTS / f"{NAME}-build.json"
    if args.render:
        reports = json.loads(out_json.read_text())
    else:
        ctx = dynq.RunContext(threads=2)
        dynq.fetch(f"zoo:{NAME}", ctx=ctx)
        model = zoo.DERIVED[NAME]
        reports = {"coactivation": json.loads(model.report_path(ctx.cache_dir).read_text())}
        base, calib = dynq.fetch(f"zoo:{model.base}", ctx=ctx), calibration_text(ctx.cache_dir)
        for layout in args.layout:
            with tempfile.TemporaryDirectory(dir=ctx.cache_dir) as tmp:
                settings = dataclasses.replace(MoeSettings(), layout=layout)
                built = build_moe(base, Path(tmp) / f"{layout}.gguf", calib, settings, ctx=ctx)
                reports[layout] = json.loads(json.dumps(built.to_dict()))  # keys as the JSON has them
        out_json.write_text(json.dumps(reports, indent=1) + "\n")
    (RESULTS / f"{NAME}-build.md").write_text(report(reports))
    _plot(reports, RESULTS / f"{NAME}-build.png")


if __name__ == "__main__":
    main()
