"""--tokenizer-type HuggingFaceTokenizer: megatron-core's semantics from a local tokenizer.json, and
vocabularies past uint16 end to end (preprocess -> int32 dataset -> training)."""

import json
import pickle

import numpy as np
import pytest
from fixtures_text import (HF_ADDED_TOKENS, HF_BPE_MERGES_VOCAB, HF_SPECIAL_TOKENS, LARGE_VOCAB_FILLER, call_quietly,
                           load_tool, read_jsonl_texts)
from test_tokenizer import TRICKY_TEXTS
from trainer_runs import trainer_from_flags

from megagrow.arguments import parse_args
from megagrow.data.hf_tokenizer import HuggingFaceTokenizer
from megagrow.data.indexed_dataset import IndexedDataset
from megagrow.data.tokenizer import NullTokenizer, SentencePieceTokenizer, build_tokenizer
from megagrow.errors import UserError

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def tokenizer(tiny_hf_tokenizer_dir):
    return HuggingFaceTokenizer(tiny_hf_tokenizer_dir)


def _texts(small_corpus):
    return [t for t in TRICKY_TEXTS if t] + read_jsonl_texts(small_corpus / "code.jsonl")[:5] + \
        read_jsonl_texts(small_corpus / "prose.jsonl")[:20] + [f"text {HF_ADDED_TOKENS[1]} around an added token"]


def test_vocab_counts_added_tokens_and_eod_is_the_eos(tokenizer):
    assert tokenizer.vocab_size == HF_BPE_MERGES_VOCAB + len(HF_ADDED_TOKENS)
    assert tokenizer.eod == tokenizer.eos_id == tokenizer._tokenizer.token_to_id(HF_SPECIAL_TOKENS[0])
    assert tokenizer.bos_id == tokenizer._tokenizer.token_to_id(HF_SPECIAL_TOKENS[1])
    assert tokenizer.pad_id is None


def test_no_bos_is_added_and_text_round_trips(tokenizer, small_corpus):
    for text in _texts(small_corpus):
        ids = tokenizer.encode(text)
        assert tokenizer.bos_id not in ids  # the tokenizer.json's BOS post-processor is not applied
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text  # byte-level BPE is lossless
    assert tokenizer.decode(tokenizer.encode("end.") + [tokenizer.eod]) == "end."


def test_same_ids_vocab_and_eod_as_megatron_core(tokenizer, tiny_hf_tokenizer_dir, small_corpus):
    pytest.importorskip("transformers")
    pytest.importorskip("megatron.core")
    from megatron.core.tokenizers import MegatronTokenizer  # megatron-core 0.16's default tokenizer system

    reference = MegatronTokenizer.from_pretrained(tokenizer_path=str(tiny_hf_tokenizer_dir),
                                                  metadata_path={"library": "huggingface"})
    assert tokenizer.vocab_size == reference.vocab_size
    assert tokenizer.eod == reference.eod
    for text in _texts(small_corpus):
        assert tokenizer.encode(text) == reference.tokenize(text)


def test_pickles_as_its_path(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.model == tokenizer.model and clone.encode("x = 1") == tokenizer.encode("x = 1")


def test_a_tokenizer_json_file_works_as_well_as_its_directory(tiny_hf_tokenizer_dir, tokenizer):
    assert HuggingFaceTokenizer(tiny_hf_tokenizer_dir / "tokenizer.json").encode("abc") == tokenizer.encode("abc")


def test_user_errors_are_one_line(tmp_path, tiny_hf_tokenizer_dir):
    cases = [
        ("NousResearch/Llama-2-7b-chat-hf", "no such local directory; megagrow reads a directory"),
        (tmp_path, "no tokenizer.json there"),
    ]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    cases.append((broken, "not a tokenizers tokenizer.json"))
    for model, message in cases:
        with pytest.raises(UserError, match=message) as info:
            HuggingFaceTokenizer(model)
        assert "\n" not in str(info.value)
    no_eos = tmp_path / "no_eos"
    no_eos.mkdir()
    (no_eos / "tokenizer.json").write_text((tiny_hf_tokenizer_dir / "tokenizer.json").read_text())
    with pytest.raises(UserError, match="names no eos_token"):
        HuggingFaceTokenizer(no_eos).eod
    (no_eos / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<not in vocab>"}))
    with pytest.raises(UserError, match="eos_token '<not in vocab>' is not in tokenizer.json"):
        HuggingFaceTokenizer(no_eos)


def test_megatron_tokenizer_type_names(tiny_tokenizer_model, tiny_hf_tokenizer_dir):
    for name in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        assert isinstance(build_tokenizer(name, tiny_tokenizer_model), SentencePieceTokenizer)
    assert isinstance(build_tokenizer("HuggingFaceTokenizer", tiny_hf_tokenizer_dir), HuggingFaceTokenizer)
    null = build_tokenizer("NullTokenizer", None, vocab_size=100)
    assert isinstance(null, NullTokenizer) and (null.vocab_size, null.eod) == (101, 100)
    assert null.encode("5 7  99") == [5, 7, 99] and null.decode([5, 7]) == "5 7"
    for name, message in (("TikTokenizer", "no tiktoken reader"), ("GPT2BPETokenizer", "save GPT-2's vocab.json"),
                          ("Bogus", "not a Megatron tokenizer megagrow knows")):
        with pytest.raises(UserError, match=message):
            build_tokenizer(name, tiny_hf_tokenizer_dir)
    with pytest.raises(UserError, match="needs --vocab-size"):
        build_tokenizer("NullTokenizer", None)


def test_training_takes_the_vocabulary_from_the_tokenizer(tiny_hf_tokenizer_dir):
    flags = ["--model-preset", "tiny", "--mock-data", "--train-iters", "1"]
    config = parse_args(flags + ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                                 str(tiny_hf_tokenizer_dir)])
    assert config.model.vocab_size == HF_BPE_MERGES_VOCAB + len(HF_ADDED_TOKENS)
    # Megatron's NullTokenizer: the given ids plus one eod id.
    assert parse_args(flags + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "500"]).model.vocab_size == 501
    with pytest.raises(UserError, match="--vocab-size 1000 differs from the 802 tokens"):
        parse_args(flags + ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                            str(tiny_hf_tokenizer_dir), "--vocab-size", "1000"])


@pytest.fixture(scope="module")
def large_vocab_dataset(large_hf_tokenizer_dir, small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("large_vocab")
    source = out / "prose.jsonl"
    texts = read_jsonl_texts(small_corpus / "prose.jsonl")[:60]
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    summary = call_quietly(load_tool("preprocess_data").main, [
        "--input", source, "--output-prefix", out / "prose", "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", large_hf_tokenizer_dir, "--append-eod", "--workers", 1])
    return summary.outputs[0], texts  # one dataset per key; "text" is the only key


def test_vocabularies_past_uint16_are_stored_as_int32(large_vocab_dataset, large_hf_tokenizer_dir):
    prefix, texts = large_vocab_dataset
    tokenizer = HuggingFaceTokenizer(large_hf_tokenizer_dir)
    assert tokenizer.vocab_size > 65_500
    dataset = IndexedDataset(prefix)
    assert dataset.dtype == np.int32
    for index in (0, 7, len(texts) - 1):
        stored = np.asarray(dataset[index]).tolist()
        assert stored == tokenizer.encode(texts[index]) + [tokenizer.eod]
        assert min(stored) >= LARGE_VOCAB_FILLER  # only ids uint16 could not hold


def test_megatron_core_reads_the_int32_dataset(large_vocab_dataset):
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset

    prefix, _ = large_vocab_dataset
    ours, theirs = IndexedDataset(prefix), MegatronIndexedDataset(prefix)
    assert theirs.index.dtype == np.int32 and len(theirs) == len(ours)
    for index in (0, 5, len(ours) - 1):
        assert np.asarray(theirs[index]).tolist() == np.asarray(ours[index]).tolist()


def test_a_few_training_iterations_on_the_int32_dataset(large_vocab_dataset, large_hf_tokenizer_dir, tmp_path):
    prefix, _ = large_vocab_dataset
    flags = ["--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
             "--train-iters", "3", "--lr", "3e-3", "--split", "1,0,0", "--eval-interval", "0", "--log-interval", "1",
             "--data-path", prefix, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
             str(large_hf_tokenizer_dir), "--metrics-file", str(tmp_path / "metrics.jsonl")]
    with trainer_from_flags(flags) as trainer:
        assert trainer.model_config.vocab_size == HuggingFaceTokenizer(large_hf_tokenizer_dir).vocab_size
        assert int(trainer.datasets.train[0]["tokens"].max()) >= LARGE_VOCAB_FILLER
        trainer.run()
        losses = [loss for _, loss in trainer.losses]
    assert len(losses) == 3 and all(np.isfinite(losses))
