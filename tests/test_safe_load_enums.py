"""Enum members pickled by name (`getattr(Enum, "MEMBER")`, as Python 3.11.0-3.11.4 write them) load; any other
getattr in a checkpoint is refused in one line.

Megatron-LM's `args` and torch_dist `.metadata` hold enums; a cluster image with such a Python writes
them this way, and torch's weights_only loader refuses `builtins.getattr` outright.
"""

import argparse
import enum
import importlib.util
import pickle
import sys
import types

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megagrow.checkpoint.safe_load import load_dcp_metadata, load_file
from megagrow.errors import UserError


class _ByNamePickler(pickle.Pickler):
    """Pickles enum members as getattr(cls, name), whatever this Python does by default."""

    def reducer_override(self, obj):
        if isinstance(obj, enum.Enum):
            return getattr, (type(obj), obj.name)
        return NotImplemented


BY_NAME = types.SimpleNamespace(Pickler=_ByNamePickler, __name__="by_name_pickle")


@pytest.fixture
def megatron_enum(monkeypatch):
    """An enum class importable as megatron.fake_enums.ModelType while the fixture lives."""
    if importlib.util.find_spec("megatron") is None:
        monkeypatch.setitem(sys.modules, "megatron", types.ModuleType("megatron"))
    module = types.ModuleType("megatron.fake_enums")
    model_type = enum.Enum("ModelType", {"encoder_or_decoder": 1, "encoder_and_decoder": 2})
    model_type.__module__ = module.__name__
    module.ModelType = model_type
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return model_type


def _save_args(path, model_type):
    args = argparse.Namespace(num_layers=2, model_type=model_type.encoder_and_decoder)
    torch.save({"args": args, "iteration": 10, "w": torch.ones(2)}, path, pickle_module=BY_NAME)


def test_a_megatron_enum_pickled_by_name_loads_without_megatron(megatron_enum, monkeypatch, tmp_path):
    _save_args(tmp_path / "model_optim_rng.pt", megatron_enum)
    monkeypatch.delitem(sys.modules, "megatron.fake_enums")  # as on a machine without that Megatron version
    loaded = load_file(tmp_path / "model_optim_rng.pt")
    assert loaded["iteration"] == 10 and torch.equal(loaded["w"], torch.ones(2))
    assert repr(loaded["args"].model_type) == "megatron.fake_enums.ModelType.encoder_and_decoder"


def test_a_megatron_enum_pickled_by_name_loads_beside_megatron(megatron_enum, tmp_path):
    _save_args(tmp_path / "model_optim_rng.pt", megatron_enum)
    model_type = load_file(tmp_path / "model_optim_rng.pt")["args"].model_type
    # torch may resolve the class to the installed one: then the member itself, else a record naming it
    assert model_type is megatron_enum.encoder_and_decoder or model_type.member_name == "encoder_and_decoder"


class _Sneaky:
    def __reduce__(self):
        return getattr, (argparse.Namespace, "__init__")


def test_getattr_on_anything_else_is_refused_in_one_line(tmp_path):
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"args": _Sneaky()}, path)
    with pytest.raises(UserError, match=r"model_optim_rng.pt: refused, it calls getattr\(<class 'argparse.Namespace'>, "
                                        r"'__init__'\), not on an enum member") as err:
        load_file(path)
    assert "\n" not in str(err.value)


def test_torch_dist_metadata_with_enums_pickled_by_name_loads(tmp_path):
    dcp.save({"w": torch.arange(6.0).reshape(2, 3)}, checkpoint_id=str(tmp_path), no_dist=True)
    metadata = load_dcp_metadata(tmp_path / ".metadata")
    with open(tmp_path / ".metadata", "wb") as f:
        _ByNamePickler(f).dump(metadata)
    assert load_dcp_metadata(tmp_path / ".metadata") == metadata
    with open(tmp_path / ".metadata", "wb") as f:
        pickle.dump(_Sneaky(), f)
    with pytest.raises(UserError, match="refused or unreadable"):
        load_dcp_metadata(tmp_path / ".metadata")
