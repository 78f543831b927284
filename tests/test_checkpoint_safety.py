"""No checkpoint runs code: a poisoned file in any kind of checkpoint is refused in one line, before
anything is loaded, and nothing runs and nothing is written (issue 14, item 1).

The poison is an object whose unpickling runs a shell command that creates a marker file;
loading it with torch.load(weights_only=False), as DeepSpeed's engine would, creates the marker.
"""

import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from data_factory import random_documents, write_dataset
from megagrow.config import DataConfig, TrainConfig
from megagrow.errors import UserError
from megagrow.training.preflight import check_before_building

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RunsCode:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _flags(data_prefix, iters, extra=()):
    return ["--model-preset", "tiny", "--vocab-size", "1000", "--seq-length", "16", "--data-path", data_prefix,
            "--split", "1,0,0", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(iters),
            "--lr", "3e-3", "--log-interval", "1", "--eval-interval", "0", *extra]


def _pretrain(flags, cwd):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *flags], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "docs", random_documents(3, 300, 60))


# A checkpoint in DeepSpeed's own format, written by DeepSpeed's engine (megagrow v1, ZeRO-1 on 2 ranks):
# only tools/convert_deepspeed_checkpoint.py reads it.
DEEPSPEED_FORMAT = os.path.join(ROOT, "tests", "data", "megagrow_v1_deepspeed_zero1")


@pytest.fixture(scope="module")
def deepspeed_checkpoint(tmp_path_factory, data_prefix):
    """A ZeRO-1 checkpoint (megagrow's format) written by pretrain_gpt.py --deepspeed in ONE process (no launcher)."""
    pytest.importorskip("deepspeed")
    ckpt = tmp_path_factory.mktemp("ds") / "ckpt"
    result = _pretrain(_flags(data_prefix, 2, ["--deepspeed", "--zero-stage", "1", "--save", str(ckpt)]), ckpt.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return ckpt


def _native(tmp_path_factory, data_prefix, ckpt_format):
    ckpt = tmp_path_factory.mktemp(ckpt_format) / "ckpt"
    result = _pretrain(_flags(data_prefix, 2, ["--save", str(ckpt), "--ckpt-format", ckpt_format]), ckpt.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return ckpt


@pytest.fixture(scope="module")
def native_checkpoint(tmp_path_factory, data_prefix):
    return _native(tmp_path_factory, data_prefix, "torch")


@pytest.fixture(scope="module")
def torch_dist_checkpoint(tmp_path_factory, data_prefix):
    return _native(tmp_path_factory, data_prefix, "torch_dist")


def _poison(path, marker):
    """Add the code-running object to a checkpoint file (a tensor-and-plain-data dict) in place."""
    content = torch.load(path, map_location="cpu", weights_only=False)  # our own file: trusted here
    content["payload"] = RunsCode(marker)
    torch.save(content, path)


def _snapshot(directory):
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


def _copy(checkpoint, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    return target


def test_single_process_deepspeed_runs_and_resumes_safely(deepspeed_checkpoint, data_prefix, tmp_path):
    # item 4: --deepspeed with one process and no launcher (it died in DeepSpeed's broadcast before).
    ckpt = _copy(deepspeed_checkpoint, tmp_path)
    result = _pretrain(_flags(data_prefix, 3, ["--deepspeed", "--zero-stage", "1", "--save", str(ckpt),
                                               "--load", str(ckpt)]), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and "iteration 3/3" in result.stderr


def test_pretrain_refuses_a_poisoned_deepspeed_checkpoint(deepspeed_checkpoint, data_prefix, tmp_path):
    ckpt = _copy(deepspeed_checkpoint, tmp_path)
    victim = "iter_0000002/mp_rank_00/model_optim_rng.pt"  # the weights and, with one dp rank, the Adam state
    marker = tmp_path / "code_ran"
    _poison(ckpt / victim, marker)
    before = _snapshot(ckpt)
    result = _pretrain(_flags(data_prefix, 4, ["--deepspeed", "--zero-stage", "1", "--save", str(ckpt),
                                               "--load", str(ckpt)]), tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {ckpt / victim}: refused, it would import")
    assert [line for line in result.stderr.splitlines() if "error" in line.lower()] == \
        [result.stderr.strip().splitlines()[-1]]
    assert "DeepSpeed engine" not in result.stderr  # refused before the model and engine were built
    assert not marker.exists()
    assert _snapshot(ckpt) == before


def test_pretrain_refuses_deepspeeds_own_format_before_building(data_prefix, tmp_path):
    """DeepSpeed's engine would unpickle its files whole: such a checkpoint is refused, pointing at the converter."""
    ckpt = _copy(DEEPSPEED_FORMAT, tmp_path)
    before = _snapshot(ckpt)
    result = _pretrain(_flags(data_prefix, 4, ["--deepspeed", "--zero-stage", "1", "--load", str(ckpt)]), tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --load {ckpt} is in DeepSpeed's own checkpoint format, which megagrow does not let DeepSpeed load "
        f"(its files are unpickled whole); convert it once with python tools/convert_deepspeed_checkpoint.py "
        f"--load {ckpt} --save NEW_DIR")
    assert "DeepSpeed engine" not in result.stderr
    assert _snapshot(ckpt) == before


def test_pretrain_refuses_a_poisoned_native_shard(native_checkpoint, data_prefix, tmp_path):
    ckpt = _copy(native_checkpoint, tmp_path)
    marker = tmp_path / "code_ran"
    victim = ckpt / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt"
    _poison(victim, marker)
    before = _snapshot(ckpt)
    result = _pretrain(_flags(data_prefix, 4, ["--save", str(ckpt), "--load", str(ckpt)]), tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {victim}: refused, it would import 'posix.system' when loaded, which can run code; megagrow loads "
        f"only tensors and plain data (delete or re-create the file)"]
    assert not marker.exists()
    assert _snapshot(ckpt) == before


def _train_config(ckpt, deepspeed=False):
    return TrainConfig(train_iters=4, load=str(ckpt), save=str(ckpt), deepspeed=deepspeed)


@pytest.mark.parametrize("victim, message", [("common.pt", "refused, it would import 'posix.system'"),
                                             (".metadata", "refused or unreadable \\(it would import posix.system\\)")])
def test_every_file_of_a_torch_dist_checkpoint_is_checked(torch_dist_checkpoint, data_prefix, tmp_path, victim,
                                                          message):
    ckpt = _copy(torch_dist_checkpoint, tmp_path)
    victim = ckpt / "iter_0000002" / victim
    if victim.suffix == ".pt":
        _poison(victim, tmp_path / "code_ran")
    else:  # torch.distributed.checkpoint's metadata is a plain pickle
        victim.write_bytes(pickle.dumps(RunsCode(tmp_path / "code_ran")))
    with pytest.raises(UserError, match=f"{victim}: {message}"):
        check_before_building(_train_config(ckpt), DataConfig(data_path=[data_prefix]))
    assert not (tmp_path / "code_ran").exists()


def test_a_pickled_tracker_is_refused_without_unpickling(native_checkpoint, data_prefix, tmp_path):
    ckpt = _copy(native_checkpoint, tmp_path)
    marker = tmp_path / "code_ran"
    torch.save({"payload": RunsCode(marker)}, ckpt / "latest_checkpointed_iteration.txt")  # a pickle, not a number
    with pytest.raises(UserError, match="latest_checkpointed_iteration.txt: cannot be read"):
        check_before_building(_train_config(ckpt), DataConfig(data_path=[data_prefix]))
    assert not marker.exists()


def _tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("victim, content, message", [
    ("latest", None, "not a DeepSpeed tag file"),
    ("latest", b"../../elsewhere", "is not a checkpoint tag"),
    ("latest", b"iter_0000099", "names tag 'iter_0000099' but"),
    ("iter_0000002/mp_rank_00_model_states.pt", None, "refused, it would import 'posix.system'"),
    ("zero3:iter_0000002/zero_pp_rank_1_mp_rank_00_optim_states.pt", None, "refused, it would import 'posix.system'"),
], ids=["latest-pickle", "latest-path", "latest-missing-tag", "model-states", "zero3-partition"])
def test_the_deepspeed_converter_refuses_poisoned_files(tmp_path, capsys, victim, content, message):
    source = DEEPSPEED_FORMAT
    if victim.startswith("zero3:"):  # ZeRO-3 weights live only in the optimizer partitions
        source, victim = DEEPSPEED_FORMAT.replace("zero1", "zero3"), victim.removeprefix("zero3:")
    ckpt = _copy(source, tmp_path)
    marker = tmp_path / "code_ran"
    if victim == "latest" and content is None:
        torch.save({"payload": RunsCode(marker)}, ckpt / victim)  # a pickle where a text file belongs
    elif content is None:
        _poison(ckpt / victim, marker)
    else:
        (ckpt / victim).write_bytes(content)
    with pytest.raises(SystemExit) as info:
        _tool("convert_deepspeed_checkpoint").main(["--load", str(ckpt), "--save", str(tmp_path / "out")])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_stacking_refuses_a_poisoned_checkpoint(native_checkpoint, tmp_path):
    marker = tmp_path / "code_ran"
    native = _copy(native_checkpoint, tmp_path / "b")
    _poison(native / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt", marker)
    with pytest.raises(SystemExit) as info:
        _tool("stack_checkpoint").main(["--load", str(native), "--save", str(tmp_path / "out_grown"),
                                        "--growth-factor", "2"])
    assert info.value.code == 2
    assert not marker.exists()
    assert not (tmp_path / "out_grown").exists()
