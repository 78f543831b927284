"""tools/build_corpus.py: a deterministic multi-domain jsonl corpus from the machine's own text."""

import gzip
import json
import sysconfig
from pathlib import Path

from fixtures_text import call_quietly, load_tool, run_tool

build_corpus = load_tool("build_corpus")
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def read_records(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def build(out: Path, *flags) -> dict:
    summaries = call_quietly(build_corpus.main, ["--output-dir", out, *flags])
    return {s.name: s for s in summaries}


def test_code_and_prose_from_the_stdlib_respect_caps(tmp_path):
    summaries = build(
        tmp_path, "--domains", "code", "prose", "--max-bytes-per-domain", 60_000, "--max-docs-per-domain", 12
    )
    assert set(summaries) == {"code", "prose"}
    for name, summary in summaries.items():
        records = read_records(tmp_path / f"{name}.jsonl")
        assert len(records) == summary.documents and 0 < summary.documents <= 12
        assert sum(len(r["text"].encode("utf-8")) for r in records) == summary.bytes <= 60_000
    for record in read_records(tmp_path / "code.jsonl"):
        source = STDLIB / record["source"].removeprefix(f"{build_corpus.STDLIB_SOURCE_TAG}/")
        assert source.read_text(encoding="utf-8") == record["text"]  # a code document is the file, unchanged


def test_same_seed_same_bytes_other_seed_other_sample(tmp_path):
    flags = ["--domains", "code", "prose", "--max-docs-per-domain", 8, "--max-bytes-per-domain", 50_000]
    build(tmp_path / "a", *flags, "--seed", 7)
    build(tmp_path / "b", *flags, "--seed", 7)
    build(tmp_path / "c", *flags, "--seed", 8)
    for name in ("code.jsonl", "prose.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "code.jsonl").read_bytes() != (tmp_path / "c" / "code.jsonl").read_bytes()


def test_prose_joins_a_modules_docstrings_in_source_order(tmp_path):
    module = tmp_path / "stdlib" / "sample.py"
    module.parent.mkdir()
    module.write_text(
        '"""Module summary."""\n\nclass Thing:\n    """A thing.\n\n        Indented detail.\n    """\n\n'
        '    def method(self):\n        """Do it."""\n\n\ndef helper():\n    """Help."""\n',
        encoding="utf-8",
    )
    build(tmp_path / "out", "--domains", "prose", "--stdlib-dir", module.parent, "--share-dir", tmp_path / "empty")
    [record] = read_records(tmp_path / "out" / "prose.jsonl")
    assert record == {
        "text": "Module summary.\n\nA thing.\n\nIndented detail.\n\nDo it.\n\nHelp.",
        "source": "python-stdlib/sample.py",
    }


def test_undecodable_and_unparsable_files_are_skipped_and_counted(tmp_path):
    stdlib = tmp_path / "stdlib"
    (stdlib / "site-packages").mkdir(parents=True)
    (stdlib / "good.py").write_text('"""Fine."""\nx = 1\n', encoding="utf-8")
    (stdlib / "latin1.py").write_bytes(b'"""caf\xe9"""\n')
    (stdlib / "broken.py").write_text('"""Doc."""\ndef (:\n', encoding="utf-8")
    (stdlib / "site-packages" / "thirdparty.py").write_text('"""Not stdlib."""\n', encoding="utf-8")
    summaries = build(
        tmp_path / "out", "--domains", "code", "prose", "--stdlib-dir", stdlib, "--share-dir", tmp_path / "empty"
    )
    assert summaries["code"].documents == 2 and summaries["code"].skipped == {"not UTF-8": 1}
    assert summaries["prose"].documents == 1 and summaries["prose"].skipped == {"not UTF-8": 1, "not parsable": 1}
    sources = {r["source"] for r in read_records(tmp_path / "out" / "code.jsonl")}
    assert sources == {"python-stdlib/good.py", "python-stdlib/broken.py"}


def test_debian_domains_appear_only_when_installed(tmp_path):
    share = tmp_path / "share"
    fortunes = share / "games" / "fortunes"
    fortunes.mkdir(parents=True)
    (fortunes / "wisdom").write_text("First fortune.\n%\nSecond,\n  on two lines.\n%\n", encoding="utf-8")
    (fortunes / "wisdom.dat").write_bytes(b"\x00\x01binary")
    dictd = share / "dictd"
    dictd.mkdir()
    entries = [b"header info\n", b"hacker\n n.\n\n  A person who enjoys code.\n", b"kludge\n n.\n\n  A clumsy fix.\n"]
    (dictd / "jargon.dict.dz").write_bytes(gzip.compress(b"".join(entries)))

    def b64(n: int) -> str:  # dictd numbers: base64 digits, most significant first
        digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        return digits[n // 64] + digits[n % 64]

    offsets = [0, len(entries[0]), len(entries[0]) + len(entries[1])]
    index = [f"00-database-info\t{b64(offsets[0])}\t{b64(len(entries[0]))}"]
    index += [f"{w}\t{b64(o)}\t{b64(len(e))}" for w, o, e in zip(["hacker", "kludge"], offsets[1:], entries[1:])]
    (dictd / "jargon.index").write_text("\n".join(index) + "\n", encoding="utf-8")

    summaries = build(tmp_path / "out", "--max-docs-per-domain", 3, "--share-dir", share)
    assert {"code", "prose", "fortunes", "jargon"} <= set(summaries)
    assert sorted(r["text"] for r in read_records(tmp_path / "out" / "fortunes.jsonl")) == [
        "First fortune.",
        "Second,\n  on two lines.",
    ]
    jargon = sorted(r["text"] for r in read_records(tmp_path / "out" / "jargon.jsonl"))
    assert jargon == ["hacker\n n.\n\n  A person who enjoys code.", "kludge\n n.\n\n  A clumsy fix."]

    bare = build(tmp_path / "bare", "--max-docs-per-domain", 1, "--share-dir", tmp_path / "nothing")
    assert set(bare) == {"code", "prose"}


def test_unavailable_domain_is_one_line_error(tmp_path):
    result = run_tool(
        "build_corpus", "--output-dir", tmp_path, "--domains", "fortunes", "--share-dir", tmp_path / "nothing"
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--domains fortunes: not available here" in result.stderr
