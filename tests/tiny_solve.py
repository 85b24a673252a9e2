"""The tiny model, calibration text, imatrix and profile that the solve tests share (built once per test run by the
`made` fixture in conftest.py), and the settings that keep them quick."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from dynq.cli import app
from dynq.lab.synthetic import write_synthetic

CALIB = " ".join(f"the {w} of and to in def return" for w in "abcdefghijklmnopqrstuvwxyz" * 20)
FAST = ["--ctx", "64", "--chunks", "1", "--rows", "32", "--group-blocks", "2"]
TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q8_0"]


def solve_inputs(d: Path) -> dict[str, Path]:
    """A tiny llama, its calibration text, imatrix and profile, made through the CLI into `d`."""
    runner = CliRunner()
    text = d / "calib.txt"
    text.write_text(CALIB)
    tiny = write_synthetic("llama", d / "tiny.gguf")
    imatrix = d / "tiny.imatrix.gguf"
    ran = runner.invoke(app, ["imatrix", str(tiny), "--text", str(text), "-o", str(imatrix), "--ctx", "64",
                              "--chunks", "2", "--threads", "2"])  # fmt: skip
    assert ran.exit_code == 0, ran.output
    profile = d / "tiny.profile"
    ran = runner.invoke(app, ["profile", str(tiny), "--imatrix", str(imatrix), "--text", str(text), "-o", str(profile),
                              "--threads", "2", *FAST])  # fmt: skip
    assert ran.exit_code == 0, ran.output
    return {"dir": d, "tiny": tiny, "imatrix": imatrix, "profile": profile, "text": text}
