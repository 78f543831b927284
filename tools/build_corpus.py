"""Build a small real multi-domain jsonl corpus from text every machine already has.

Domains:
  code     the Python standard library's .py sources, one document per file
  prose    the standard library's docstrings, one document per module
  fortunes fortune cookies, one per document   (only with Debian's fortunes packages)
  jargon   Jargon File entries, one per document (only with Debian's dict-jargon)
  legal    the license texts in common-licenses (only on Debian-like systems)

Writes `{output_dir}/{domain}.jsonl` with lines `{"text": ..., "source": ...}`. The output
depends only on the files present and on --seed: sources are walked in sorted order, then
shuffled with the seed so that the per-domain caps take a random sample rather than the
alphabetically first files. Documents over --max-doc-bytes are left out (in the stdlib,
generated tables and giant test modules).

    python tools/build_corpus.py --output-dir data/corpus --max-bytes-per-domain 4000000
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import os
import random
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from megagrow.errors import UserError, exit_on_user_error, positive_int

STDLIB_SOURCE_TAG = "python-stdlib"
# Third-party code installed into the interpreter is not part of the standard library.
_NOT_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}
# Documents in a row that overflow --max-bytes-per-domain before the domain counts as full.
_MISSES_BEFORE_FULL = 20
# dictd base64: the standard alphabet, most significant digit first, no padding.
_DICTD_DIGITS = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


@dataclass(frozen=True)
class Document:
    """One corpus document and where its text came from."""

    text: str
    source: str


@dataclass(frozen=True)
class Domain:
    """A named document source; `documents(skipped)` yields in sampling order, counting skips by reason."""

    name: str
    documents: Callable[[Counter], Iterator[Document]]


# ---------------------------------------------------------------------------- python stdlib


def stdlib_python_files(stdlib_dir: Path) -> list[Path]:
    """The standard library's .py files in sorted order, third-party packages excluded."""
    files = []
    for directory, subdirs, names in os.walk(stdlib_dir):
        subdirs[:] = sorted(d for d in subdirs if d not in _NOT_STDLIB_DIRS)
        files.extend(Path(directory, n) for n in sorted(names) if n.endswith(".py"))
    return files


def _read_utf8(path: Path, skipped: Counter) -> str | None:
    """File text, or None (counted) when it is not UTF-8; a few stdlib test files are not, on purpose."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        skipped["not UTF-8"] += 1
    except OSError:
        skipped["unreadable"] += 1
    return None


def code_documents(files: list[Path], stdlib_dir: Path, skipped: Counter) -> Iterator[Document]:
    """Each source file is one document."""
    for path in files:
        text = _read_utf8(path, skipped)
        if text is not None and text.strip():
            yield Document(text, f"{STDLIB_SOURCE_TAG}/{path.relative_to(stdlib_dir).as_posix()}")


def module_docstrings(tree: ast.Module) -> list[str]:
    """Module, class and function docstrings of a parsed module, in source order, dedented."""
    found = []

    def visit(node: ast.AST) -> None:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            found.append(doc)
        for child in getattr(node, "body", []):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child)

    visit(tree)
    return found


def prose_documents(files: list[Path], stdlib_dir: Path, skipped: Counter) -> Iterator[Document]:
    """A module's docstrings joined by blank lines form one document.

    Single docstrings are often one line ("Return the size."); a module's docstrings
    together read like a manual page, long enough to carry context across sentences.
    """
    for path in files:
        source = _read_utf8(path, skipped)
        if source is None:
            continue
        try:
            tree = ast.parse(source, filename=str(path))
        except (SyntaxError, ValueError):  # stdlib tests ship deliberately broken files
            skipped["not parsable"] += 1
            continue
        docstrings = module_docstrings(tree)
        if docstrings:
            yield Document("\n\n".join(docstrings), f"{STDLIB_SOURCE_TAG}/{path.relative_to(stdlib_dir).as_posix()}")


# ------------------------------------------------------------------- optional Debian domains


def fortune_documents(fortune_dir: Path, rng: random.Random, skipped: Counter) -> Iterator[Document]:
    """Each fortune (entries are separated by lines holding only '%') is one document."""
    documents = []
    for path in sorted(fortune_dir.iterdir()):
        if not path.is_file() or path.suffix in (".dat", ".u8") or path.stat().st_size == 0:
            continue  # .dat are binary offset tables; .u8 are empty UTF-8 markers
        text = _read_utf8(path, skipped)
        if text is None:
            continue
        entries = text.split("\n%\n")
        documents += [
            Document(e.strip("\n%"), f"fortunes/{path.name}#{i}") for i, e in enumerate(entries) if e.strip("\n%")
        ]
    rng.shuffle(documents)
    yield from documents


def _dictd_number(digits: str) -> int:
    value = 0
    for c in digits:
        value = value * 64 + _DICTD_DIGITS[c]
    return value


def jargon_documents(dictd_dir: Path, rng: random.Random, skipped: Counter) -> Iterator[Document]:
    """Each Jargon File entry is one document; the dictd index gives its byte range."""
    data = gzip.decompress((dictd_dir / "jargon.dict.dz").read_bytes())  # dictzip is gzip-compatible
    documents = []
    for line in (dictd_dir / "jargon.index").read_text(encoding="utf-8").splitlines():
        headword, offset, length = line.rsplit("\t", 2)
        if headword.startswith("00-database"):
            continue  # dictd metadata, not dictionary text
        start = _dictd_number(offset)
        try:
            text = data[start : start + _dictd_number(length)].decode("utf-8").strip()
        except UnicodeDecodeError:
            skipped["not UTF-8"] += 1
            continue
        if text:
            documents.append(Document(text, f"jargon/{headword}"))
    rng.shuffle(documents)
    yield from documents


def license_documents(license_dir: Path, rng: random.Random, skipped: Counter) -> Iterator[Document]:
    """Each license text is one document; symlinked aliases (GPL -> GPL-3) are read once."""
    seen, documents = set(), []
    for path in sorted(license_dir.iterdir()):
        real = path.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        text = _read_utf8(real, skipped)
        if text and text.strip():
            documents.append(Document(text, f"common-licenses/{path.name}"))
    rng.shuffle(documents)
    yield from documents


# ------------------------------------------------------------------------------- building


def available_domains(stdlib_dir: Path, share_dir: Path, seed: int) -> list[Domain]:
    """The stdlib domains always; the Debian ones only when their files are installed."""
    files = stdlib_python_files(stdlib_dir)
    if not files:
        raise UserError(f"no .py files under {stdlib_dir}; pass --stdlib-dir pointing at a Python standard library")
    random.Random(seed).shuffle(files)
    domains = [
        Domain("code", lambda skipped: code_documents(files, stdlib_dir, skipped)),
        Domain("prose", lambda skipped: prose_documents(files, stdlib_dir, skipped)),
    ]
    fortune_dir = share_dir / "games" / "fortunes"
    if fortune_dir.is_dir():
        domains.append(Domain("fortunes", lambda skipped: fortune_documents(fortune_dir, random.Random(seed), skipped)))
    dictd_dir = share_dir / "dictd"
    if (dictd_dir / "jargon.dict.dz").is_file() and (dictd_dir / "jargon.index").is_file():
        domains.append(Domain("jargon", lambda skipped: jargon_documents(dictd_dir, random.Random(seed), skipped)))
    license_dir = share_dir / "common-licenses"
    if license_dir.is_dir():
        domains.append(Domain("legal", lambda skipped: license_documents(license_dir, random.Random(seed), skipped)))
    return domains


@dataclass
class DomainSummary:
    """What was written for one domain."""

    name: str
    path: str
    documents: int
    bytes: int
    skipped: dict[str, int]


def write_domain(
    domain: Domain, output_dir: Path, max_docs: int | None, max_bytes: int | None, max_doc_bytes: int | None = None
) -> DomainSummary:
    """Write documents in sampling order up to the caps; the file gets its final name only when complete."""
    path = output_dir / f"{domain.name}.jsonl"
    tmp_path = path.with_name(path.name + f".tmp-{os.getpid()}")
    skipped: Counter = Counter()
    documents = total_bytes = misses = 0
    try:
        with open(tmp_path, "w", encoding="utf-8") as out:
            for doc in domain.documents(skipped):
                if max_docs is not None and documents >= max_docs:
                    break
                try:
                    size = len(doc.text.encode("utf-8"))
                except UnicodeEncodeError:  # a docstring escape such as "\udc80" makes a lone surrogate
                    skipped["not encodable as UTF-8"] += 1
                    continue
                if max_doc_bytes is not None and size > max_doc_bytes:
                    skipped["larger than --max-doc-bytes"] += 1
                    continue
                if max_bytes is not None and total_bytes + size > max_bytes:
                    # Skip rather than stop, so one large file cannot leave the domain near
                    # empty; a run of misses means the budget is as good as full.
                    misses += 1
                    if misses == _MISSES_BEFORE_FULL:
                        break
                    continue
                misses = 0
                out.write(json.dumps({"text": doc.text, "source": doc.source}, ensure_ascii=False) + "\n")
                documents += 1
                total_bytes += size
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return DomainSummary(domain.name, str(path), documents, total_bytes, dict(skipped))


def build_corpus(
    output_dir: Path,
    stdlib_dir: Path,
    share_dir: Path,
    max_docs: int | None = None,
    max_bytes: int | None = None,
    seed: int = 1234,
    domains: Iterable[str] | None = None,
    max_doc_bytes: int | None = None,
) -> list[DomainSummary]:
    """Write every available (or every requested) domain to `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    available = available_domains(stdlib_dir, share_dir, seed)
    if domains is not None:
        by_name = {d.name: d for d in available}
        missing = [name for name in domains if name not in by_name]
        if missing:
            raise UserError(
                f"--domains {' '.join(missing)}: not available here (available: {' '.join(by_name)}); "
                f"install the Debian package that provides it or drop it"
            )
        available = [by_name[name] for name in domains]
    return [write_domain(d, output_dir, max_docs, max_bytes, max_doc_bytes) for d in available]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", required=True, type=Path, help="directory for {domain}.jsonl")
    parser.add_argument(
        "--max-docs-per-domain", type=positive_int, default=None, help="cap on documents per domain (default: all)"
    )
    parser.add_argument(
        "--max-bytes-per-domain",
        type=positive_int,
        default=None,
        help="cap on UTF-8 text bytes per domain (default: all)",
    )
    parser.add_argument(
        "--max-doc-bytes",
        type=positive_int,
        default=1 << 18,
        help="skip larger documents: the stdlib's largest files are generated tables (pydoc_data/topics.py) "
        "and giant test modules (default: 256 KiB)",
    )
    parser.add_argument(
        "--seed", type=int, default=1234, help="seed of the shuffle that picks documents under the caps"
    )
    parser.add_argument("--domains", nargs="+", default=None, help="only these domains (default: every available one)")
    parser.add_argument(
        "--stdlib-dir",
        type=Path,
        default=Path(sysconfig.get_paths()["stdlib"]),
        help="Python standard library to read (default: this interpreter's)",
    )
    parser.add_argument(
        "--share-dir", type=Path, default=Path("/usr/share"), help="where Debian text packages are looked up"
    )
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[DomainSummary]:
    """Build the corpus and print what each domain holds."""
    args = parse_args(argv)
    summaries = build_corpus(
        args.output_dir,
        args.stdlib_dir,
        args.share_dir,
        args.max_docs_per_domain,
        args.max_bytes_per_domain,
        args.seed,
        args.domains,
        args.max_doc_bytes,
    )
    print(f"{'domain':<10} {'documents':>10} {'bytes':>12}  path")
    for s in summaries:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(s.skipped.items()))
        print(
            f"{s.name:<10} {s.documents:>10,} {s.bytes:>12,}  {s.path}" + (f"  (skipped: {skipped})" if skipped else "")
        )
    return summaries


if __name__ == "__main__":
    main()
