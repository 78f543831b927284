"""The 7B G_stack recipe's YAML and DeepSpeed json files describe a valid 64-GPU run."""

import json
import os
from pathlib import Path

import pytest

from megagrow.arguments import parse_args
from megagrow.config import num_parameters
from megagrow.training.deepspeed_backend import build_deepspeed_config
from megagrow.training.trainer import micro_batches_per_step

RECIPE = Path(__file__).resolve().parent.parent / "examples" / "gstack_7b"


@pytest.mark.parametrize("yaml_name, layers, tp", [("base.yaml", 8, 1), ("grown.yaml", 32, 2), ("in_run.yaml", 8, 2)])
@pytest.mark.parametrize("ds_json", ["ds_zero1.json", "ds_zero2.json", "ds_zero3_offload.json"])
def test_recipe_configs_parse_for_64_gpus(monkeypatch, yaml_name, layers, tp, ds_json):
    monkeypatch.setenv("WORLD_SIZE", "64")
    config = parse_args(["--config", str(RECIPE / yaml_name), "--mock-data", "--save", "ckpt", "--deepspeed",
                         "--deepspeed_config", str(RECIPE / ds_json)])
    assert config.model.num_layers == layers and config.model.hidden_size == 4096
    assert config.parallel.tp == tp and config.parallel.dp == 64 // tp
    ds = build_deepspeed_config(config.train, config.parallel, micro_batches_per_step(config.train, config.parallel.dp))
    assert ds["train_batch_size"] == 1024 and ds["bf16"]["enabled"] is True
    assert ds["train_micro_batch_size_per_gpu"] * config.parallel.dp == 1024


def test_grown_model_is_llama2_7b_and_base_a_quarter_of_its_layers(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "64")
    base = parse_args(["--config", str(RECIPE / "base.yaml"), "--mock-data", "--save", "ckpt"]).model
    grown = parse_args(["--config", str(RECIPE / "grown.yaml"), "--mock-data", "--save", "ckpt"]).model
    assert num_parameters(grown) == 6_738_415_616
    assert grown.num_layers == 4 * base.num_layers
    assert base.replace(num_layers=grown.num_layers) == grown


def test_in_run_recipe_grows_the_base_into_llama2_7b_at_10b_tokens(monkeypatch):
    from megagrow.growth.in_run import growth_iteration, phase_configs

    monkeypatch.setenv("WORLD_SIZE", "64")
    config = parse_args(["--config", str(RECIPE / "in_run.yaml"), "--mock-data", "--save", "ckpt"])
    base_train, grown_model, grown_train = phase_configs(config.model, config.train)
    assert num_parameters(grown_model) == 6_738_415_616 and config.train.stack_optimizer_state
    assert growth_iteration(config.train, 2048) == base_train.train_iters == 4769  # 10B / 2M tokens, rounded up
    assert grown_train.train_iters == 143052 and base_train.lr_decay_iters == grown_train.lr_decay_iters == 143052


def test_json_files_are_valid_json():
    for path in RECIPE.glob("*.json"):
        json.loads(path.read_text())
    assert os.access(RECIPE / "run_deepspeed.sh", os.X_OK)


@pytest.mark.parametrize("ds_json", ["ds_zero1.json", "ds_zero2.json", "ds_zero3_offload.json"])
def test_recipe_jsons_leave_precision_to_the_flags(monkeypatch, ds_json):
    # "auto" as their README says: the same json serves the bf16 cluster run and an fp32 trial on CPU.
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = parse_args(["--model-preset", "tiny", "--mock-data", "--train-iters", "2", "--micro-batch-size", "1",
                         "--global-batch-size", "2", "--deepspeed", "--deepspeed_config", str(RECIPE / ds_json)])
    ds = build_deepspeed_config(config.train, config.parallel, micro_batches_per_step(config.train, config.parallel.dp))
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
