"""No checkpoint runs code: a poisoned file in any kind of checkpoint is refused in one line, before
anything is loaded, and nothing runs and nothing is written (issue 14, item 1).

The poison is an object whose unpickling runs a shell command that creates a marker file;
loading it with torch.load(weights_only=False), as DeepSpeed's engine does, creates the marker.
"""

import os
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


@pytest.fixture(scope="module")
def deepspeed_checkpoint(tmp_path_factory, data_prefix):
    """A ZeRO-1 checkpoint written by pretrain_gpt.py --deepspeed in ONE process (no launcher, CPU)."""
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


@pytest.mark.parametrize("victim", ["iter_0000002/mp_rank_00_model_states.pt",
                                    "iter_0000002/zero_pp_rank_0_mp_rank_00_optim_states.pt"],
                         ids=["model-states", "zero-optimizer-partition"])
def test_pretrain_refuses_a_poisoned_deepspeed_checkpoint(deepspeed_checkpoint, data_prefix, tmp_path, victim):
    ckpt = _copy(deepspeed_checkpoint, tmp_path)
    marker = tmp_path / "code_ran"
    _poison(ckpt / victim, marker)
    before = _snapshot(ckpt)
    result = _pretrain(_flags(data_prefix, 4, ["--deepspeed", "--zero-stage", "1", "--save", str(ckpt),
                                               "--load", str(ckpt)]), tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {ckpt / victim}: refused, it would import")
    assert [line for line in result.stderr.splitlines() if "error" in line.lower()] == \
        [result.stderr.strip().splitlines()[-1]]
    assert "AdamW backend" not in result.stderr  # refused before the model and engine were built
    assert not marker.exists()
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


@pytest.mark.parametrize("victim", ["common.pt", "megagrow_optimizer_tp00_pp000_dp000.pt"])
def test_every_file_of_a_torch_dist_checkpoint_is_checked(torch_dist_checkpoint, data_prefix, tmp_path, victim):
    ckpt = _copy(torch_dist_checkpoint, tmp_path)
    victim = ckpt / "iter_0000002" / victim
    _poison(victim, tmp_path / "code_ran")
    with pytest.raises(UserError, match=f"{victim}: refused, it would import 'posix.system'"):
        check_before_building(_train_config(ckpt), DataConfig(data_path=[data_prefix]))
    assert not (tmp_path / "code_ran").exists()


@pytest.mark.parametrize("tracker, content, message", [
    ("latest_checkpointed_iteration.txt", None, "latest_checkpointed_iteration.txt: cannot be read"),
    ("latest", None, "not a DeepSpeed tag file"),
    ("latest", b"../../elsewhere", "is not a checkpoint tag"),
    ("latest", b"iter_0000099", "names tag 'iter_0000099' but"),
], ids=["tracker-pickle", "latest-pickle", "latest-path", "latest-missing-tag"])
def test_poisoned_tracker_files_are_refused_without_unpickling(deepspeed_checkpoint, data_prefix, tmp_path, tracker,
                                                             content, message):
    ckpt = _copy(deepspeed_checkpoint, tmp_path)
    marker = tmp_path / "code_ran"
    if content is None:
        torch.save({"payload": RunsCode(marker)}, ckpt / tracker)  # a pickle where a text file belongs
    else:
        (ckpt / tracker).write_bytes(content)
    with pytest.raises(UserError, match=message):
        check_before_building(_train_config(ckpt, deepspeed=True), DataConfig(data_path=[data_prefix]))
    assert not marker.exists()


def test_deepspeed_engine_loads_only_plain_data(deepspeed_checkpoint, tmp_path):
    """The second guard: inside the engine's load every torch.load is weights_only, even DeepSpeed's own
    weights_only=False calls, so a file the pre-check did not see cannot run code either."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from megagrow.training.deepspeed_backend import weights_only_loading

    ckpt = _copy(deepspeed_checkpoint, tmp_path)
    clean = ckpt / "iter_0000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with weights_only_loading(ckpt / "iter_0000002"):
        state = TorchCheckpointEngine().load(str(clean), map_location="cpu")  # DeepSpeed's records load as such
    assert type(state["optimizer_state_dict"]["zero_stage"]).__name__ == "ZeroStageEnum"
    marker = tmp_path / "code_ran"
    _poison(clean, marker)
    with pytest.raises(UserError, match="refused a file that would import more than tensors.*GLOBAL posix.system"):
        with weights_only_loading(ckpt / "iter_0000002"):
            TorchCheckpointEngine().load(str(clean), map_location="cpu")
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_offline_tools_refuse_poisoned_checkpoints(deepspeed_checkpoint, native_checkpoint, tmp_path):
    import importlib.util

    def tool(name):
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    marker = tmp_path / "code_ran"
    ds = _copy(deepspeed_checkpoint, tmp_path / "a")
    _poison(ds / "iter_0000002" / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(SystemExit) as info:
        tool("convert_deepspeed_checkpoint").main(["--load", str(ds), "--save", str(tmp_path / "out_ds")])
    assert info.value.code == 2
    native = _copy(native_checkpoint, tmp_path / "b")
    _poison(native / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt", marker)
    with pytest.raises(SystemExit) as info:
        tool("stack_checkpoint").main(["--load", str(native), "--save", str(tmp_path / "out_grown"),
                                       "--growth-factor", "2"])
    assert info.value.code == 2
    assert not marker.exists()
    assert not (tmp_path / "out_ds").exists() and not (tmp_path / "out_grown").exists()
