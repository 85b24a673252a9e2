"""Rules the test suite keeps so that it cannot hang or hurt the machine it runs on: every child process it waits for
has a time limit, no test or bench signals processes by name (only the ones it started, by their id), and the unit
lane stays offline and model-free."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
WAITS = {"subprocess.run", "subprocess.call", "subprocess.check_call", "subprocess.check_output"}


def calls_without_timeout(source: str) -> list[int]:
    """Lines of `source` that wait for a child process with no time limit."""
    return [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and ast.unparse(node.func) in WAITS
            and not any(k.arg in ("timeout", None) for k in node.keywords)]  # fmt: skip


def test_every_child_process_a_test_waits_for_has_a_timeout() -> None:
    missing = [f"{path.name}:{line}" for path in sorted((ROOT / "tests").glob("*.py"))
               for line in calls_without_timeout(path.read_text())]  # fmt: skip
    assert missing == [], "give these a timeout=: " + ", ".join(missing)


def test_the_rule_sees_a_call_without_one() -> None:
    sample = "import subprocess\nsubprocess.run(['true'])\nsubprocess.run(['true'], timeout=5)\n"
    assert calls_without_timeout(sample) == [2]


def test_nothing_signals_processes_by_name() -> None:
    by_name = re.compile(r"""["'\[ ](pgrep|pkill|killall)\b""")
    offenders = [f"{path.relative_to(ROOT)}:{i}" for folder in ("tests", "bench", "scripts", ".ci")
                 for path in sorted((ROOT / folder).rglob("*")) if path.is_file() and path.suffix in (".py", ".sh", "")
                 for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
                 if by_name.search(line) and path != Path(__file__)]  # fmt: skip
    assert offenders == [], offenders


INNER = """
import pytest
from dynq.sources import zoo


def test_unmarked(tmp_path):
    zoo.fetch("smollm2-135m", tmp_path)


@pytest.mark.model
def test_marked(tmp_path):
    with pytest.raises(Exception) as caught:  # zoo's own refusal, not the lane's
        zoo.fetch("no-such-model", tmp_path)
    assert "mark it" not in str(caught.value)
"""


def test_a_unit_test_reaching_for_a_model_fails(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lane's guard (tests/conftest.py), run on a test that fetches a model without the `model` marker."""
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_inner=INNER)
    pytester.makeini("[pytest]\nmarkers =\n    unit: u\n    model: m\n    cluster: c\n    slow: s\n    gpu: g\n")
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:timeout")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*a unit test fetched a zoo model: mark it `model`*"])


def promises(doc: str) -> dict[str, list[tuple[str, str]]]:
    """Each promise of docs/reliability.md (a bullet with a bold title) and the tests it names, as (file, function):
    `*tests/FILE.py*` or `*tests/FILE.py::test_name*`."""
    found = {}
    for bullet in re.split(r"\n(?=- \*\*|#)", doc):
        if title := re.match(r"- \*\*(.+?)\*\*", bullet):
            refs = re.findall(r"\*(tests/\w+\.py)(?:::(\w+))?\*", re.sub(r"\s+", " ", bullet))
            found[title.group(1)] = refs
    return found


def test_every_promise_of_the_reliability_doc_names_tests_that_exist() -> None:
    found = promises((ROOT / "docs" / "reliability.md").read_text())
    assert len(found) >= 15
    missing = {title: refs for title, refs in found.items() if not refs}
    assert missing == {}, f"promises with no test named: {list(missing)}"
    for title, refs in found.items():
        for file, function in refs:
            path = ROOT / file
            assert path.is_file(), (title, file)
            if function:
                assert re.search(rf"^def {function}\(", path.read_text(), re.M), (title, f"{file}::{function}")


def test_the_promise_reader_sees_a_promise_without_a_test() -> None:
    doc = "# x\n\n- **Kept.** words *tests/test_resume.py*\n- **Bare.** words, no test\n"
    assert promises(doc) == {"Kept.": [("tests/test_resume.py", "")], "Bare.": []}
