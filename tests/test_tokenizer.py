"""SentencePiece wrapper and tools/train_tokenizer.py."""

import gzip
import json
import pickle

import pytest
from tqdm import tqdm
from fixtures_text import TINY_VOCAB_SIZE, load_tool, read_jsonl_texts, run_tool

from megagrow.data.tokenizer import SentencePieceTokenizer, build_tokenizer
from megagrow.errors import UserError

TRICKY_TEXTS = [
    "",
    " ",
    "   leading and trailing spaces   ",
    "\n\nblank lines\n\n\n",
    "tabs\tand\r\nwindows line ends",
    "    def indented(self):\n        return {'a': [1, 2, 3]}\n",
    "Unicode: héllo wörld, 日本語, emoji 😀🚀, math ∑∫√",
    "control \x00 \x07 \x1b[0m characters",
    "digits 1234567890 3.14159e-10",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_model):
    return SentencePieceTokenizer(tiny_tokenizer_model)


def test_special_ids_and_vocab_size(tokenizer):
    assert tokenizer.vocab_size == TINY_VOCAB_SIZE
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, 3)
    assert tokenizer.eod == tokenizer.eos_id


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_round_trip_of_tricky_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.unk_id not in ids  # byte fallback: nothing is unknown
    assert tokenizer.decode(ids) == text


def test_round_trip_of_real_code_and_prose(tokenizer, small_corpus):
    texts = read_jsonl_texts(small_corpus / "code.jsonl") + read_jsonl_texts(small_corpus / "prose.jsonl")
    assert len(texts) > 20
    for text in texts:
        if "\u2581" not in text:  # SentencePiece's own space marker decodes as a space (documented)
            assert tokenizer.decode(tokenizer.encode(text)) == text


def test_eod_decodes_to_nothing(tokenizer):
    assert tokenizer.decode(tokenizer.encode("end.") + [tokenizer.eod]) == "end."


def test_pickles_as_its_path(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.model_path == tokenizer.model_path
    assert clone.encode(TRICKY_TEXTS[5]) == tokenizer.encode(TRICKY_TEXTS[5])
    assert len(pickle.dumps(tokenizer)) < 500


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="tokenizer model not found: .*nope.model"):
        SentencePieceTokenizer(tmp_path / "nope.model")


def test_non_model_file_is_a_user_error(tiny_tokenizer_model):
    vocab_file = tiny_tokenizer_model.with_suffix(".vocab")
    with pytest.raises(UserError, match=r"tiny\.vocab is not a SentencePiece model"):
        SentencePieceTokenizer(vocab_file)


def test_build_tokenizer_reads_sentencepiece_under_megatrons_names(tiny_tokenizer_model):
    for name in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        assert build_tokenizer(name, tiny_tokenizer_model).vocab_size == TINY_VOCAB_SIZE
    with pytest.raises(UserError, match="--tokenizer-type GPT2BPETokenizer is not supported"):
        build_tokenizer("GPT2BPETokenizer", tiny_tokenizer_model)
    with pytest.raises(UserError, match="--tokenizer-model is required"):
        build_tokenizer("SentencePieceTokenizer", None)


def test_train_tokenizer_cli_reads_gz_jsonl_and_text_and_reports_bad_lines(tmp_path, small_corpus):
    texts = read_jsonl_texts(small_corpus / "prose.jsonl")[:40]
    jsonl_gz = tmp_path / "prose.jsonl.gz"
    with gzip.open(jsonl_gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": texts[0]}) + "\n")
        f.write("{not json\n")  # line 2
        f.write(json.dumps({"other": "x"}) + "\n")  # line 3
        for text in texts[1:]:
            f.write(json.dumps({"text": text}) + "\n")
    plain = tmp_path / "notes.txt"
    plain.write_text("plain text lines are sentences too\nsecond line\n", encoding="utf-8")
    result = run_tool(
        "train_tokenizer",
        "--input",
        jsonl_gz,
        plain,
        "--output-prefix",
        tmp_path / "tok",
        "--vocab-size",
        400,
        "--num-threads",
        1,
    )
    assert result.returncode == 0, result.stderr
    assert "line 2: invalid JSON" in result.stderr and "line 3: missing key 'text'" in result.stderr
    assert "vocab_size=400" in result.stdout
    tokenizer = SentencePieceTokenizer(tmp_path / "tok.model")
    assert tokenizer.decode(tokenizer.encode(texts[3])) == texts[3]
    assert (tmp_path / "tok.vocab").is_file()


def test_train_tokenizer_cli_missing_input_is_one_line(tmp_path):
    result = run_tool(
        "train_tokenizer",
        "--input",
        tmp_path / "absent.jsonl",
        "--output-prefix",
        tmp_path / "tok",
        "--vocab-size",
        400,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: input file not found: {tmp_path / 'absent.jsonl'}; check the path"
    ]
    assert not (tmp_path / "tok.model").exists()


def test_train_tokenizer_cli_vocab_too_large_for_corpus_is_one_line(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("just a few words\nnot enough for many pieces\n", encoding="utf-8")
    result = run_tool(
        "train_tokenizer",
        "--input",
        corpus,
        "--output-prefix",
        tmp_path / "tok",
        "--vocab-size",
        5000,
        "--num-threads",
        1,
    )
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "lower --vocab-size" in error_lines[0]


def test_lone_surrogate_is_named_not_opaque(tokenizer):
    with pytest.raises(UnicodeEncodeError, match="surrogates not allowed"):
        tokenizer.encode("text with \ud800 in it")


def test_trainer_sentences_are_lines_and_long_lines_are_cut_not_dropped():
    train_tokenizer = load_tool("train_tokenizer")
    long_line = "é" * (train_tokenizer.MAX_SENTENCE_BYTES // 2 + 10)  # 2 bytes each: just over the cap
    stats = train_tokenizer.CorpusStats()
    with tqdm(disable=True) as progress:
        sentences = list(train_tokenizer.iter_sentences(iter(["a\n\n  b  \n", long_line]), stats, progress))
    assert sentences[:2] == ["a", "  b  "]  # blank lines dropped, whitespace kept
    assert "".join(sentences[2:]) == long_line and len(sentences) == 4
    assert all(len(s.encode("utf-8")) <= train_tokenizer.MAX_SENTENCE_BYTES for s in sentences)
    assert (stats.documents, stats.sentences, stats.long_lines_cut) == (2, 4, 1)
