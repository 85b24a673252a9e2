"""quantize and profile on a local Ray cluster against the same work in one process, on the same machine.

The cluster is tests/local_ray.py's: a head without CPUs and two worker nodes of one CPU each, separate `ray start`
processes. Rows: a quantize in one process (2 threads), in 2 local processes, on the cluster, and on the cluster with a
worker process killed mid-task; the errors phase of a profile in one process and on the cluster. Every output is
compared byte for byte with the one-process run. Writes bench/results/cluster.{md,json}.

    .venv/bin/python bench/cluster.py [--model zoo:qwen2.5-coder-0.5b] [--recipe uniform-q4_k]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import dynq
from local_ray import LocalCluster, local_cluster
from runs import measurements

RESULTS = Path(__file__).parent / "results"
PROFILE = ["--ctx", "64", "--chunks", "1", "--rows", "64", "--group-blocks", "30"]


def dynq_cli(*args: str, env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dynq.cli", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"dynq {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done


def killing_a_worker(cluster: LocalCluster, stop: threading.Event, killed: list[int]) -> None:
    while not killed and not stop.is_set():
        found = cluster.running("ray::encode_task")  # this bench's own cluster only
        if found:
            os.kill(found[0], signal.SIGKILL)
            killed.append(found[0])
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:qwen2.5-coder-0.5b")
    parser.add_argument("--recipe", default="uniform-q4_k")
    args = parser.parse_args()
    load = os.getloadavg()[0]  # other work on the machine makes every row slower
    ctx = dynq.RunContext(threads=2)
    dynq.fetch(args.model, ctx=ctx)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dynq-cluster-") as tmp_name:
        tmp = Path(tmp_name)
        ref = tmp / "ref-f16.gguf"
        dynq.quantize(dynq.plan(args.model, "f16", ctx=ctx), ref, ctx=ctx)
        plan = dynq.plan(ref, args.recipe, ctx=ctx)
        tasks = sum(p.info.shape[2] if len(p.info.shape) == 3 else 1 for p in plan.tensors)
        text = tmp / "calib.txt"
        text.write_text((dynq.calibration(ctx=ctx).text * 2)[:200_000])

        def quantize(label: str, *extra: str, kill: LocalCluster | None = None) -> None:
            out = tmp / f"{label}.gguf"
            killed: list[int] = []
            stop = threading.Event()
            killer = threading.Thread(target=killing_a_worker, args=(kill, stop, killed)) if kill else None
            if killer is not None:
                killer.start()
            seconds, _ = dynq_cli("quantize", str(ref), "-r", args.recipe, "-o", str(out), *extra)
            stop.set()
            if killer is not None:
                killer.join()
            same = out.read_bytes() == (tmp / "serial.gguf").read_bytes() if label != "serial" else True
            rows.append({"what": f"quantize {args.recipe}", "where": label, "tasks": tasks,
                         "seconds": round(seconds, 1), "identical": same,
                         "killed_worker_pid": killed[0] if killed else None})  # fmt: skip
            print(rows[-1], flush=True)
            if label != "serial":
                out.unlink()

        def profile(label: str, *extra: str) -> None:
            out = tmp / f"{label}.profile.json"
            env = os.environ | {"DYNQ_CACHE_DIR": str(tmp / f"cache-{label}")}
            seconds, _ = dynq_cli("profile", str(ref), "--text", str(text), *PROFILE, *extra, "-o", str(out), env=env)
            data = json.loads(out.read_text())
            same = measurements(out) == measurements(tmp / "serial.profile.json")
            rows.append({"what": "profile (errors, probes)", "where": label,
                         "tasks": f"{len(data['tensors'])} + {len(data['probes'])}", "seconds": round(seconds, 1),
                         "errors_seconds": round(data["seconds"]["errors"], 1),
                         "probes_seconds": round(data["seconds"]["probes"], 1), "identical": same,
                         "killed_worker_pid": None})  # fmt: skip
            print(rows[-1], flush=True)

        quantize("serial", "--threads", "2")
        quantize("2 local processes", "--processes", "2")
        profile("serial", "--threads", "2")
        with local_cluster(tmp, workers=2) as cluster:
            quantize("Ray: 2 worker nodes x 1 CPU", "--ray", cluster.address)
            quantize("Ray, a worker killed mid-task", "--ray", cluster.address, kill=cluster)
            profile("Ray: 2 worker nodes x 1 CPU", "--ray", cluster.address)
    meta = {"model": args.model, "recipe": args.recipe, "machine": f"{os.cpu_count()} cores",
            "load_average_at_start": round(load, 2)}  # fmt: skip
    (RESULTS / "cluster.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# quantize and profile on a local Ray cluster",
        "",
        f"{args.model} (F16 reference), {os.cpu_count()} cores. The cluster: a head without CPUs and two worker nodes "
        "of one CPU each, separate `ray start` processes on this machine (tests/local_ray.py). One process uses 2 "
        "threads. Seconds: the command's wall time (start-up included). Identical: the output (quantize) or every "
        "measurement (profile: errors, probe KLDs, sensitivities) equals the one-process run's. Load average at the "
        f"start: {load:.1f}. Rerun: `.venv/bin/python bench/cluster.py`.",
        "",
        "| work | where | tasks | seconds | identical | worker killed (pid) |",
        "|---|---|---:|---:|---|---|",
    ]
    for r in rows:
        same = "yes" if r["identical"] else "NO"
        lines.append(f"| {r['what']} | {r['where']} | {r['tasks']} | {r['seconds']} | {same} "
                     f"| {r['killed_worker_pid'] or '-'} |")  # fmt: skip
    lines += [
        "",
        "On one machine the cluster has the same two cores as the one process and pays for Ray's scheduling, each "
        "worker reopening the source and a task per tensor, so it is slower here; what it shows is that the output "
        "is the same bytes, also after a worker died mid-task and Ray ran its task again. docs/scale.md projects "
        "what many nodes give.",
    ]
    (RESULTS / "cluster.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
