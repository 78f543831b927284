"""What a newcomer trips on (issue 14, item 4): the vocabulary of real data, tokens outside it, the start-up
log, --help, and the quickstart's summary sentences."""

import importlib.util
import os

import numpy as np
import pytest

from data_factory import random_documents, write_dataset
from megagrow.arguments import build_parser, describe, parse_args
from megagrow.data.gpt_dataset import GPTDatasetConfig, build_gpt_datasets
from megagrow.errors import UserError
from megagrow.training.data_setup import micro_batch_iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--model-preset", "tiny", "--train-iters", "2", "--micro-batch-size", "1", "--global-batch-size", "1"]


def test_real_data_needs_the_vocabulary_it_was_tokenized_with(tmp_path):
    prefix = write_dataset(tmp_path / "docs", random_documents(1, 20, 30))
    with pytest.raises(UserError, match="--data-path without --tokenizer-model or --vocab-size"):
        parse_args([*RUN, "--data-path", prefix])  # the preset's 1024 would be a guess
    assert parse_args([*RUN, "--data-path", prefix, "--vocab-size", "1000"]).model.vocab_size == 1000
    assert parse_args([*RUN, "--mock-data"]).model.vocab_size == 1024  # random tokens need none


def _out_of_vocabulary_dataset(tmp_path):
    documents = random_documents(2, 30, 40)
    documents[11] = np.full(25, 4321, dtype=np.int64)
    prefix = write_dataset(tmp_path / "docs", documents)
    config = GPTDatasetConfig(seq_length=16, split="1", vocab_size=1000)
    return prefix, build_gpt_datasets(prefix, config, [None, 0, 0])[0]


def test_a_token_outside_the_vocabulary_stops_with_one_line_naming_it(tmp_path):
    prefix, dataset = _out_of_vocabulary_dataset(tmp_path)
    with pytest.raises(UserError) as info:
        for index in range(len(dataset)):
            dataset[index]
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{prefix}: token id 4321 (in train sample ") and "vocabulary of 1000" in message


def test_the_check_keeps_one_line_through_data_loader_workers(tmp_path):
    prefix, dataset = _out_of_vocabulary_dataset(tmp_path)
    batches = micro_batch_iterator(dataset, 0, 2, 0, 1, num_workers=1)
    with pytest.raises(UserError) as info:
        for _ in batches:
            pass
    assert "\n" not in str(info.value) and str(info.value).startswith(f"{prefix}: token id 4321")


def test_start_up_log_is_one_line_per_fact_and_only_of_features_in_use():
    lines = describe(parse_args([*RUN, "--mock-data"]))
    assert lines[0].startswith("model: 2 layers, hidden 64") and all("{" not in line for line in lines)
    assert not any(line.startswith(("growth", "checkpoints")) for line in lines)
    grows = describe(parse_args([*RUN, "--mock-data", "--save", "ckpt", "--grow-at-tokens", "1000"]))
    assert "growth: x4 (depth:stack) at 1000 tokens" in grows and any(line.startswith("checkpoints") for line in grows)


def test_help_lists_fp16_beside_bf16():
    groups = {group.title: [a.option_strings[0] for a in group._group_actions if a.option_strings]
              for group in build_parser()._action_groups}
    assert "--fp16" in groups["training"] and "--bf16" in groups["training"]


def _module(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_summary_sentences_say_what_happened(tmp_path):
    report = _module("examples/quickstart_report.py")
    scratch = [(100_000, 5.0), (409_600, 4.0)]
    assert report.growth_verdict([(100_000, 4.5), (300_000, 3.9)], scratch) == (
        "Base then grown reached the scratch run's final validation loss (4.0000) after 266,667 tokens, where "
        "scratch needed 409,600: 34.9% fewer tokens.")
    assert report.growth_verdict([(100_000, 4.8), (409_600, 4.2)], scratch) == (
        "Base then grown did not reach the scratch run's final validation loss (4.0000) within the same 409,600 "
        "tokens; its own last validation loss is 4.2000.")
    metrics = tmp_path / "metrics.jsonl"
    from megagrow.training.metrics import MetricsWriter

    writer = MetricsWriter(metrics)
    for step in (75, 200):  # a resumed leg: iterations 51-200, logged every 25
        writer.write("train", step, {"loss": 3.0, "consumed_tokens": step * 100, "tokens_per_second": 1.0})
    writer.close()
    summary = _module("tools/metrics_summary.py").summarize(str(metrics))
    assert summary.splitlines()[-1] == "training loss 3.0000 at iteration 75 -> 3.0000 at iteration 200"
