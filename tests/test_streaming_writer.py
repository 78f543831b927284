"""Streamed shard files (megagrow/checkpoint/streaming_writer.py): the file loads as torch.save of the whole
record would, and growing a checkpoint holds one group of tensors at a time, never a whole target shard."""

import gc
import zipfile

import numpy as np
import pytest
import torch
from data_factory import random_documents, write_dataset
from distributed_harness import run_distributed
from trainer_runs import trainer_from_flags

from megagrow.checkpoint import streaming_writer
from megagrow.checkpoint.layout import load_shard, shard_path
from megagrow.checkpoint.megatron_state import with_extra_states
from megagrow.checkpoint.reader import CheckpointReader, group_keys, group_param_names
from megagrow.checkpoint.reshard import reader_from_state_dict, save_sharded, stage_shard
from megagrow.checkpoint.safe_load import load_file
from megagrow.checkpoint.streaming_writer import ShardStream, write_in_memory, write_streamed
from megagrow.checkpoint.tp_layout import full_shape
from megagrow.config import ModelConfig
from megagrow.growth import GrowthSpec, stacking
from megagrow.growth.operators import grown_config
from megagrow.growth.run_state import RunStateOptions, RunStateWriter

CONFIG = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                     vocab_size=50, seq_length=8, make_vocab_size_divisible_by=8)


def assert_same(a, b, where=()):
    """Equal records: same types, keys in the same order, tensors equal in dtype, shape and value."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape) and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):  # numpy's RNG state inside Megatron's rng_state record
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], (*where, key))
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, (*where, index))
    else:
        assert a == b, where


def _record():
    generator = torch.Generator().manual_seed(0)
    big = torch.randn(300, 40, generator=generator)
    return {
        "model": {"empty": torch.empty(0, 3), "w": big, "half": torch.randn(7, 3, generator=generator).to(torch.bfloat16),
                  "scalar": torch.tensor(2.5), "flags": torch.tensor([True, False]), "empty2": torch.empty(0)},
        "rng": torch.get_rng_state(),
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(300, 40, generator=generator)}},
                      "masters": [None, torch.randn(5, generator=generator)]},
        "view": torch.arange(10)[2:5],  # a real view: saved with its whole storage, as torch.save does
        "iteration": 5,
        "config": {"sizes": [1, 2, (3, 4)], "name": "x"},
    }


def _stream(record):
    """The record with its model, moments and masters deferred to fills, in two groups."""
    skeleton = {**record, "model": {name: tensor.to("meta") for name, tensor in record["model"].items()},
                "optimizer": {"state": {0: {**record["optimizer"]["state"][0],
                                            "exp_avg": record["optimizer"]["state"][0]["exp_avg"].to("meta")}},
                              "masters": [None, record["optimizer"]["masters"][1].to("meta")]}}
    fills = [{("model", name): tensor for name, tensor in record["model"].items()},
             {("optimizer", "state", 0, "exp_avg"): record["optimizer"]["state"][0]["exp_avg"],
              ("optimizer", "masters", 1): record["optimizer"]["masters"][1]}]
    return ShardStream(skeleton, fills)


@pytest.mark.parametrize("write, mmap", [(write_streamed, False), (write_streamed, True), (write_in_memory, False)],
                         ids=["read", "mapped", "fallback-in-memory"])
def test_streamed_file_loads_as_torch_save_of_the_whole_record(tmp_path, write, mmap):
    record = _record()
    write(tmp_path / "streamed.pt", _stream(record))
    torch.save(record, tmp_path / "whole.pt")
    streamed = torch.load(tmp_path / "streamed.pt", weights_only=True, mmap=mmap)
    assert_same(streamed, torch.load(tmp_path / "whole.pt", weights_only=True))
    with zipfile.ZipFile(tmp_path / "streamed.pt") as archive:
        assert archive.testzip() is None  # the data records carry their CRC-32, as torch.save writes them


@pytest.mark.parametrize("change, message", [
    (lambda fills: fills[:1], "never arrived"),
    (lambda fills: [*fills, {("model", "w"): torch.zeros(300, 40)}], "not awaited"),
    (lambda fills: [{**fills[0], ("model", "w"): torch.zeros(40, 300)}, fills[1]], r"reserved \(300, 40\)"),
], ids=["missing", "twice", "wrong-shape"])
def test_fills_that_do_not_match_the_skeleton_are_refused(tmp_path, change, message):
    stream = _stream(_record())
    with pytest.raises(ValueError, match=message):
        write_streamed(tmp_path / "bad.pt", ShardStream(stream.record, change(list(stream.fills))))


def _cpu_heap_storages() -> dict[int, int]:
    """data_ptr -> bytes of every heap-allocated CPU tensor storage alive (memory-mapped ones are not resizable)."""
    storages = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor):  # (isinstance trips deprecation shims' __class__)
            continue
        try:
            storage = obj.untyped_storage()
            if storage.device.type == "cpu" and storage.resizable():
                storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (fake, functional) left by other tests
            continue
    return storages


def _live_heap_bytes(ignore: set[int]) -> int:
    """Bytes of heap tensor storages alive now that were not in `ignore`."""
    # reference counting frees groups as they are dropped: no gc.collect() needed
    return sum(nbytes for pointer, nbytes in _cpu_heap_storages().items() if pointer not in ignore)


def _watch_writes(monkeypatch) -> list[int]:
    """Live heap bytes at each tensor the streaming writer writes, counting only what appeared since now."""
    gc.collect()
    ignore = set(_cpu_heap_storages())
    seen, write = [], streaming_writer.write_tensor

    def watched(writer, path, tensor):
        seen.append(_live_heap_bytes(ignore))
        write(writer, path, tensor)

    monkeypatch.setattr(streaming_writer, "write_tensor", watched)
    return seen


def _save_base(root, config):
    generator = torch.Generator().manual_seed(0)
    full = {name: torch.randn(full_shape(name, config), generator=generator)
            for group in group_keys(config) for name in group_param_names(group, config)}
    save_sharded(root, 3, config, reader_from_state_dict(full, config), tp=1, pp=1, progress=False)


def test_growing_holds_one_group_at_a_time_not_the_target_shard(tmp_path, monkeypatch):
    _save_base(tmp_path / "base", CONFIG)
    spec = GrowthSpec("depth:stack", factor=4)  # 8 grown layers in one target shard
    seen = _watch_writes(monkeypatch)
    stacking.stack_checkpoint(tmp_path / "base", tmp_path / "grown", spec, progress=False)

    grown = CheckpointReader(tmp_path / "grown")
    group_bytes = [sum(t.nbytes for t in grown.read_group(group).values()) for group in group_keys(grown.config)]
    assert len(seen) == sum(len(group_param_names(g, grown.config)) for g in group_keys(grown.config))
    assert max(seen) <= 2 * max(group_bytes) < sum(group_bytes) / 2, (max(seen), group_bytes)

    # Plain torch.load(weights_only=True) gives what the whole-shard construction gives.
    base = CheckpointReader(tmp_path / "base")
    read_grown = stacking.grown_layer_reader(base.read_group, base.config, spec)
    expected = stage_shard(grown.config, read_grown, range(8), tp=1, tp_rank=0, first=True, last=True)
    written = load_file(shard_path(tmp_path / "grown", 3, 0, 0, 1))["model"]
    assert_same(written, with_extra_states(expected, 8, True))

    # The check sees a whole shard held: building every group before writing (the former
    # writer's way) keeps them all alive at the first write.
    seen.clear()
    stage_groups = stacking.stage_groups
    monkeypatch.setattr(stacking, "stage_groups", lambda *args, **kwargs: iter(list(stage_groups(*args, **kwargs))))
    stacking.stack_checkpoint(tmp_path / "base", tmp_path / "whole", spec, progress=False)
    assert max(seen) >= sum(group_bytes)


def _train_base(flags):
    with trainer_from_flags(flags, 1) as trainer:
        trainer.run()


def test_stacked_adam_state_streams_and_equals_the_in_memory_one(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "docs", random_documents(3, 300, 60))
    base = tmp_path / "base"
    run_distributed(_train_base, 1, [
        "--model-preset", "tiny", "--vocab-size", "1000", "--seq-length", "16", "--data-path", data, "--split", "90,10,0",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2", "--lr", "3e-3",
        "--log-interval", "100", "--eval-interval", "0", "--eval-iters", "1", "--save", str(base),
        "--metrics-file", str(tmp_path / "metrics.jsonl")])
    spec, options = GrowthSpec("depth:stack", factor=2), RunStateOptions(stack_optimizer_state=True)
    seen = _watch_writes(monkeypatch)
    stacking.stack_checkpoint(base, tmp_path / "grown", spec, tp=2, run_state=options, progress=False)

    reader = CheckpointReader(base)
    grown = grown_config(reader.config, spec)
    read_grown = stacking.grown_layer_reader(reader.read_group, reader.config, spec)
    run_state = RunStateWriter(reader, spec, options)
    shard_bytes = []
    for tp_rank in range(2):
        where = dict(tp=2, tp_rank=tp_rank, first=True, last=True)
        model = stage_shard(grown, read_grown, range(4), **where)
        loaded = load_shard(tmp_path / "grown", tp_rank=tp_rank)
        assert_same(loaded["model"], with_extra_states(model, 4, True))
        expected = run_state.records()
        for key in ("progress", "scheduler"):
            assert_same(loaded["megagrow"][key], expected[key], (key,))
        assert_same(loaded["rng_state"], expected["rng"])
        assert_same(loaded["opt_param_scheduler"], expected["opt_param_scheduler"])
        # The written moments are the base's moments G_stacked and split like the weights, built whole here.
        params = loaded["megagrow"]["optimizer"]["params"]
        for kind in run_state.state_kinds():
            read_kind = stacking.grown_layer_reader(reader.group_reader(kind), reader.config, spec)
            for name, tensor in stage_shard(grown, read_kind, range(4), **where).items():
                assert_same(params[name][kind], tensor.float(), (name, kind))
        assert {record["step"] for record in params.values()} == {2}  # the moments were carried, not left fresh
        shard_bytes.append(sum(t.nbytes for _, t in streaming_writer.walk_tensors(loaded)))
    # Moments stream one group of one kind at a time: far below a shard (model + 2x the model of moments).
    assert max(seen) < min(shard_bytes) / 2, (max(seen), shard_bytes)
