"""Error-feedback encoding against the plain encoders, at the same types (the same bytes), on one zoo model.

Steps, each a `dynq` command run as a child process so its wall time and peak RSS are its own, each kept in
~/.cache/dynq/bench-feedback/MODEL/ so a stopped run goes on where it stopped:
  1. the F16 reference of the zoo model;
  2. one pass over calibration text: the imatrix and the Gram file (`dynq imatrix --gram`);
  3. per recipe, quantize with llama.cpp's encoders (ggml), dynq's torch encoders, and feedback around ggml, all
     with the same imatrix, then judge each against the reference on evaluation text (never seen by steps 2-3)
     and continue a coding prompt with it in llama.cpp.
Writes bench/results/feedback-MODEL.md and .json.

    .venv/bin/python bench/feedback.py [--model qwen2.5-coder-1.5b] [--calib-chunks 32] [--eval-chunks 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dynq.gguf_io.partial import partial_dir

BIN = Path(sys.executable).parent / "dynq"
PROMPT = "def fibonacci(n):\n"
ENCODERS = ("ggml", "torch", "feedback")


def run(args: list[str], timeout: float = 4 * 3600) -> tuple[str, float, int]:
    """A child's stdout, its wall seconds and its own peak RSS in bytes (from wait4, before anything else reaps it)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(args, stdout=out, stderr=err, text=True)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                child.kill()
                raise SystemExit(f"{' '.join(args[:3])}... ran past {timeout:.0f} s")
            time.sleep(0.5)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        if child.returncode:
            last = err.read().strip().splitlines()
            raise SystemExit(f"{' '.join(args[:3])}... failed: {last[-1] if last else child.returncode}")
        return out.read(), seconds, usage.ru_maxrss * 1024


def cached(path: Path, make: list[str]) -> dict[str, Any]:
    """Run `make` unless `path` exists; its cost kept beside it in PATH.cost.json."""
    cost = path.with_name(path.name + ".cost.json")
    if path.exists() and cost.exists():
        return dict(json.loads(cost.read_text()))
    _, seconds, rss = run(make)
    record = {"seconds": round(seconds, 1), "peak_rss_gib": round(rss / 2**30, 2)}
    cost.write_text(json.dumps(record))
    return record


def judged(quant: Path, ref: Path, chunks: int) -> dict[str, Any]:
    out, _, _ = run([str(BIN), "eval", str(quant), "--ref", str(ref), "--chunks", str(chunks), "--json"])
    result = json.loads(out)
    text, _, _ = run([str(BIN), "run", str(quant), "-p", PROMPT, "-n", "48", "--temperature", "0", "--seed", "1"])
    result["completion"] = text.strip()
    return dict(result)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--recipes", default="uniform-q2_k,uniform-iq2_xxs")
    p.add_argument("--encoders", default=",".join(ENCODERS))
    p.add_argument("--rotated", default="", help="recipes to measure on the rotated reference too (dynq rotate)")
    p.add_argument("--calib-chunks", type=int, default=32)
    p.add_argument("--eval-chunks", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--note", default="", help="a paragraph for the table's page: what the timings ran beside")
    p.add_argument("--cached-only", action="store_true", help="rewrite the table from the rows already measured")
    a = p.parse_args()
    work = Path.home() / ".cache" / "dynq" / "bench-feedback" / a.model
    work.mkdir(parents=True, exist_ok=True)
    ref = work / f"{a.model}-f16.gguf"
    costs = {"reference": cached(ref, [str(BIN), "quantize", f"zoo:{a.model}", "-r", "f16", "-o", str(ref)])}
    passes = {"": ref}
    if a.rotated:
        passes["rotated "] = work / f"{a.model}-f16-rot.gguf"
        costs["rotation"] = cached(passes["rotated "], [str(BIN), "rotate", str(ref), "-o", str(passes["rotated "]),
                                                         "--force"])  # fmt: skip
    rows: list[dict[str, Any]] = []
    for label, source in passes.items():
        stem = work / f"{'rot-' if label else ''}calib{a.calib_chunks}"
        imatrix, gram = stem.with_suffix(".imatrix.gguf"), stem.with_suffix(".gram.gguf")
        costs[f"{label}gram"] = cached(gram, [str(BIN), "imatrix", str(source), "-o", str(imatrix), "--gram",
                                              str(gram), "--chunks", str(a.calib_chunks), "--force"])  # fmt: skip
        recipes = a.rotated.split(",") if label else a.recipes.split(",")
        encoders = ["ggml", "feedback"] if label else a.encoders.split(",")
        for recipe in recipes:
            for encoder in encoders:
                name = f"{'rot-' if label else ''}{recipe}.{encoder}"
                quant = work / f"{name}.gguf"
                if a.cached_only and not (work / f"{name}.eval{a.eval_chunks}.json").exists():
                    continue
                options = ["--gram", str(gram)] if encoder == "feedback" else []
                backend = "ggml" if encoder == "feedback" else encoder
                if not quant.exists():  # a stopped run's partial: start over, so the time is a whole run's
                    shutil.rmtree(partial_dir(quant), ignore_errors=True)
                cost = cached(quant, [str(BIN), "quantize", str(source), "-r", recipe, "-o", str(quant), "--imatrix",
                                      str(imatrix), "--backend", backend, "--force", *options])  # fmt: skip
                result_file = work / f"{name}.eval{a.eval_chunks}.json"
                if not result_file.exists():  # judged against the original reference, rotated or not
                    result_file.write_text(json.dumps(judged(quant, ref, a.eval_chunks)))
                result = json.loads(result_file.read_text())
                rows.append({"recipe": recipe, "encoder": label + encoder, "mib": quant.stat().st_size / 2**20,
                             **cost, **result})  # fmt: skip
                print(f"{recipe} {label}{encoder}: KLD {result['kld_mean']:.4f}", flush=True)
                write(a, rows, costs)


def write(a: argparse.Namespace, rows: list[dict[str, Any]], costs: dict[str, dict[str, Any]]) -> None:
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"feedback-{a.model}"  # the model's name has dots: no with_suffix
    Path(f"{stem}.json").write_text(json.dumps({"rows": rows, "stages": costs}, indent=1))
    gram_cost = costs["gram"]
    by = {(r["recipe"], r["encoder"]): r for r in rows}
    lines = [
        f"# Error-feedback encoding on {a.model}",
        "",
        f"Same imatrix and Gram matrices from one pass over {a.calib_chunks} chunks of 512 calibration tokens "
        f"(`dynq imatrix --gram`: {gram_cost['seconds']:.0f} s, peak RSS {gram_cost['peak_rss_gib']} GiB); judged "
        f"on {a.eval_chunks} chunks of the evaluation text against the F16 reference. Same recipe, same types, same "
        "tensor bytes per row group. 2 cores; times are wall seconds of each `dynq quantize`. Rows marked rotated "
        "are quantized from the reference rotated by `dynq rotate` (its own imatrix and Gram pass) and judged "
        "against the original reference.",
        "",
        "Stages: "
        + "; ".join(f"{k}: {v['seconds']:.0f} s, peak RSS {v['peak_rss_gib']} GiB" for k, v in costs.items())
        + ".",
        "",
        *([a.note, ""] if a.note else []),
        "| recipe | encoder | MiB | KLD mean | KLD p99 | top-1 | PPL | quantize s | peak RSS GiB | /ggml | /torch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g, t = by.get((r["recipe"], "ggml"), r), by.get((r["recipe"], "torch"))
        vs_t = f"{r['kld_mean'] / t['kld_mean']:.2f}" if t else "-"
        lines.append(f"| {r['recipe']} | {r['encoder']} | {r['mib']:.1f} | {r['kld_mean']:.4f} | {r['kld_p99']:.3f} | "
                     f"{r['top1'] * 100:.1f}% | {r['ppl']:.2f} | {r['seconds']:.0f} | {r['peak_rss_gib']} | "
                     f"{r['kld_mean'] / g['kld_mean']:.2f} | {vs_t} |")  # fmt: skip
    lines += ["", "Completions of `def fibonacci(n):` (greedy, 48 tokens, stock llama.cpp):", ""]
    for r in rows:
        first = " ⏎ ".join(r["completion"].splitlines()[:6]).replace("|", "\\|")
        lines.append(f"- {r['recipe']} / {r['encoder']}: `{first[:200]}`")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
