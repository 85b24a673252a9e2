"""`dynq fetch zoo:NAME` for the zoo models dynq builds: fetch the base model and the texts, then re-lay it."""

from __future__ import annotations

import json
from pathlib import Path

from dynq.calib.text import calibration_text, fetch_texts
from dynq.core.atomic import atomic_write_text
from dynq.core.context import RunContext
from dynq.moe.build import build_moe
from dynq.sources import zoo


def build_derived(model: zoo.DerivedModel, ctx: RunContext) -> Path:
    """The cached model, built first if needed; what the build measured goes beside it (`report_path`)."""
    path = model.path(ctx.cache_dir)
    if path.exists():
        return path
    base = zoo.fetch(zoo.PREFIX + model.base, ctx.cache_dir, ctx.progress)
    fetch_texts(ctx.cache_dir)
    report = build_moe(base, path, calibration_text(ctx.cache_dir), ctx=ctx)
    target = model.report_path(ctx.cache_dir)
    atomic_write_text(target, json.dumps(report.to_dict(), indent=1) + "\n")
    return path
