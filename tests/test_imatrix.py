from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dynq.core.importance import Imatrix, ImatrixEntry
from dynq.errors import DynqError
from dynq.gguf_io.imatrix import read_imatrix, write_imatrix_dat, write_imatrix_gguf
from dynq.recipe.coverage import Coverage, coverage_summary, imatrix_coverage
from dynq.recipe.plan import resolve
from dynq.recipe.presets import load_recipe
from test_rules import tiny_moe


def random_imatrix(seed: int = 0) -> Imatrix:
    rng = np.random.default_rng(seed)
    entries = {
        "blk.0.attn_q.weight": ImatrixEntry(rng.random((1, 64), dtype=np.float32) * 100, np.array([512], np.float32)),
        "blk.1.ffn_down_exps.weight": ImatrixEntry(
            rng.random((4, 32), dtype=np.float32) * 10, np.array([100, 0, 7, 300], np.float32)
        ),
    }
    return Imatrix(entries, ["calibration.txt"], chunk_count=3, chunk_size=512)


def test_gguf_round_trip(tmp_path: Path) -> None:
    imx = random_imatrix()
    path = tmp_path / "x.imatrix.gguf"
    write_imatrix_gguf(imx, path)
    back = read_imatrix(path)
    assert back.datasets == ["calibration.txt"]
    assert (back.chunk_count, back.chunk_size) == (3, 512)
    assert set(back.entries) == set(imx.entries)
    for name, e in imx.entries.items():
        np.testing.assert_array_equal(back.entries[name].sums, e.sums)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)
    assert not list(tmp_path.glob(".*tmp"))


def test_dat_round_trip_keeps_the_mean(tmp_path: Path) -> None:
    imx = random_imatrix()
    path = tmp_path / "x.dat"
    write_imatrix_dat(imx, path)
    back = read_imatrix(path)
    assert back.datasets == ["calibration.txt"]
    assert back.chunk_count == 3
    for name, e in imx.entries.items():
        got = back.entries[name].with_row_length(e.row_length)
        assert got is not None
        np.testing.assert_allclose(got.importance(), e.importance(), rtol=1e-6)


def test_importance_substitutes_ones_for_matrices_without_data() -> None:
    e = random_imatrix().entries["blk.1.ffn_down_exps.weight"]
    imp = e.importance()
    np.testing.assert_array_equal(imp[1], np.ones(32, np.float32))
    np.testing.assert_allclose(imp[0], e.sums[0] / 100)


def test_bad_imatrix_files(tmp_path: Path) -> None:
    with pytest.raises(DynqError, match="no such imatrix"):
        read_imatrix(tmp_path / "absent.dat")
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\xff\xff\xff\x7f" + b"\0" * 10)
    with pytest.raises(DynqError, match="neither a GGUF imatrix nor a legacy"):
        read_imatrix(junk)
    path = tmp_path / "cut.dat"
    write_imatrix_dat(random_imatrix(), path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DynqError, match="truncated"):
        read_imatrix(path)


def moe_imatrix(inv_seed: int = 0, drop: str | None = None, empty_expert: int | None = None) -> Imatrix:
    rng = np.random.default_rng(inv_seed)
    plan = resolve(load_recipe("dyn-iq1_s"), tiny_moe())
    entries = {}
    for t in plan.tensors:
        if t.kept or t.info.name in ("token_embd.weight", drop):
            continue
        n_mat = t.info.shape[2] if len(t.info.shape) > 2 else 1
        counts = np.full(n_mat, 1000, np.float32)
        if empty_expert is not None and n_mat > 1:
            counts[empty_expert] = 0
        entries[t.info.name] = ImatrixEntry(rng.random((n_mat, t.info.row_length), dtype=np.float32), counts)
    return Imatrix(entries, ["calib"], 2, 512)


def test_coverage_on_a_moe_plan() -> None:
    plan = resolve(load_recipe("dyn-iq1_s"), tiny_moe())
    imx = moe_imatrix(drop="blk.3.ffn_up_exps.weight", empty_expert=2)
    cov = {c.name: c for c in imatrix_coverage(plan, imx, "test.imatrix")}
    assert cov["blk.0.attn_q_a.weight"].status is Coverage.COVERED
    assert cov["token_embd.weight"].status is Coverage.MISSING and not cov["token_embd.weight"].required
    assert cov["blk.3.ffn_up_exps.weight"].status is Coverage.MISSING and cov["blk.3.ffn_up_exps.weight"].required
    partial = cov["blk.4.ffn_down_exps.weight"]
    assert partial.status is Coverage.PARTIAL and partial.n_mat_without_data == 1
    assert partial.label() == "partial (3/4 experts)"
    summary = coverage_summary(list(cov.values()), imx, "test.imatrix")
    assert summary["missing_required"] == ["blk.3.ffn_up_exps.weight"]
    assert summary["partial"]["blk.2.ffn_gate_exps.weight"] == 1


def test_imatrix_for_another_model_is_an_error() -> None:
    plan = resolve(load_recipe("dyn-iq1_s"), tiny_moe())
    imx = moe_imatrix()
    imx.entries["blk.0.attn_q_a.weight"] = ImatrixEntry(np.ones((1, 100), np.float32), np.ones(1, np.float32))
    with pytest.raises(DynqError, match="made for another model"):
        imatrix_coverage(plan, imx, "other.imatrix")
