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


def _legs(path, points):
    """A metrics file with a train and a valid record per (iteration, validation loss, FLOPs so far); 100 tokens an
    iteration."""
    from megagrow.training.metrics import MetricsWriter

    writer = MetricsWriter(path)
    for step, loss, flops in points:
        record = {"loss": loss, "consumed_tokens": step * 100, "consumed_flops": flops, "tokens_per_second": 1.0,
                  "perplexity": 2.0}
        writer.write("train", step, record)
        writer.write("valid", step, record)
    writer.close()
    return path


def test_quickstart_summary_sentences_say_what_happened(tmp_path, capsys):
    # The base's tokens cost 1 FLOP each, the grown (and scratch) model's 2: the sentence gives both shares.
    base = _legs(tmp_path / "base.jsonl", [(10, 5.0, 1000), (20, 4.6, 2000)])
    grown = _legs(tmp_path / "grown.jsonl", [(30, 4.0, 4000), (40, 3.5, 6000)])
    scratch = [_legs(tmp_path / f"scratch{seed}.jsonl", [(10, 4.9, 2000), (20, 4.3, 4000), (40, final, 8000)])
               for seed, final in ((1, 3.8), (2, 3.9))]
    grown_seed2 = _legs(tmp_path / "grown2.jsonl", [(10, 5.0, 1000), (20, 4.6, 2000), (30, 4.2, 4000), (40, 3.7, 6000)])
    report = _module("examples/quickstart_report.py")
    report.main(["--base", str(base), "--grown", str(grown), "--scratch", str(scratch[0]),
                 "--seed-pairs", str(grown_seed2), str(scratch[1]),
                 "--plot", str(tmp_path / "loss.png"), "--summary", str(tmp_path / "summary.md")])
    summary = (tmp_path / "summary.md").read_text()
    assert "| base | 2,000 | 2e+03 | 20 | 4.6000 | 4.6000 |" in summary
    assert "| scratch | 4,000 | 8e+03 | 40 | 3.8000 | 3.8000 |" in summary
    # 3.8 lies 3/5 of the way from 4.0 (3,000 tokens, 4,000 FLOPs) to 3.5 (4,000 tokens, 6,000 FLOPs)
    assert ("The grown run (base, then grown) reaches scratch's final validation loss 3.8000 with 3,400 tokens (85% of "
            "scratch's 4,000 tokens) and 4.8e+03 FLOPs (60% of scratch's 8e+03 FLOPs).") in summary
    # the second seed: 3.9 lies 3/5 of the way from 4.2 (3,000 tokens, 4,000 FLOPs) to 3.7 (4,000, 6,000)
    assert ("Over 2 seeds (a grown and a scratch run each) the grown run reaches scratch's final validation loss with "
            "85%-90% of its tokens and 60%-65% of its FLOPs; scratch's final loss moves by 0.1000 between seeds, the "
            "grown-minus-scratch gap lies between -0.3000 and -0.2000.") in summary
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()
    summarize = _module("tools/metrics_summary.py")
    summarize.main([str(base), str(grown), "--compare", str(scratch[0]), "--label", "grown",
                    "--compare-label", "scratch"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["iteration", "tokens", "FLOPs", "train", "loss", "tok/s"]
    assert lines[-1].startswith("grown reaches scratch's final validation loss 3.8000 with 3,400 tokens (85%")
    assert "training loss 5.0000 at iteration 10 -> 3.5000 at iteration 40" in lines


def test_a_resumed_leg_names_both_ends(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    from megagrow.training.metrics import MetricsWriter

    writer = MetricsWriter(metrics)
    for step in (75, 200):  # a resumed leg: iterations 51-200, logged every 25
        writer.write("train", step, {"loss": 3.0, "consumed_tokens": step * 100, "tokens_per_second": 1.0})
    writer.close()
    summary = _module("tools/metrics_summary.py").summarize(str(metrics))
    assert summary.splitlines()[-1] == "training loss 3.0000 at iteration 75 -> 3.0000 at iteration 200"
