"""HF LlamaForCausalLM <-> megagrow conversion: same logits, identical tensors, refused configs."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from megagrow.checkpoint.reshard import reader_from_state_dict, save_sharded  # noqa: E402
from megagrow.config import ModelConfig  # noqa: E402
from megagrow.model.llama import LlamaModel  # noqa: E402
from megagrow.parallel import state  # noqa: E402
from megagrow.checkpoint.reader import CheckpointReader  # noqa: E402
from fixtures_text import load_tool  # noqa: E402

convert = load_tool("convert_checkpoint").main
VOCAB = 100  # not a multiple of the padding: padding rows must be added and dropped


@pytest.fixture
def single_process():
    state.initialize(tp=1, pp=1, dp=1)
    yield
    state.destroy()


def _hf_model(tie: bool, **overrides):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, **overrides)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norm gains away from 1, so a dropped or swapped norm shows in the logits
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * (0.1 if "norm" in name else 0.02))
    return model


def _save_hf(model, path):
    model.save_pretrained(path)
    return str(path)


def _tokens(batch=2, seq=16):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def _megagrow_logits(ckpt: str, tokens: torch.Tensor) -> torch.Tensor:
    reader = CheckpointReader(ckpt)
    model = LlamaModel(reader.config).eval()
    model.load_state_dict(reader.stage_model(0, 0), strict=True)
    with torch.no_grad():
        return model(tokens)


def _tensors(hf_dir) -> dict:
    return safetensors_torch.load_file(str(hf_dir / "model.safetensors"))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_hf_to_megagrow_gives_hf_logits(tmp_path, single_process, tie):
    hf = _hf_model(tie)
    ckpt = str(tmp_path / "ckpt")
    convert(["from-hf", "--load", _save_hf(hf, tmp_path / "hf"), "--save", ckpt, "--seq-length", "32",
             "--make-vocab-size-divisible-by", "16"])
    tokens = _tokens()
    with torch.no_grad():
        expected = hf(tokens).logits
    actual = _megagrow_logits(ckpt, tokens)
    assert actual.shape == expected.shape == (2, 16, VOCAB)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_hf_round_trip_through_a_sharded_checkpoint_is_identical(tmp_path, tie):
    hf = _hf_model(tie)
    ckpt, out = str(tmp_path / "ckpt"), tmp_path / "hf_out"
    convert(["from-hf", "--load", _save_hf(hf, tmp_path / "hf"), "--save", ckpt, "--target-tensor-parallel-size", "2",
             "--target-pipeline-parallel-size", "2"])
    reader = CheckpointReader(ckpt)
    assert (reader.tp, reader.pp) == (2, 2)
    convert(["to-hf", "--load", ckpt, "--save", str(out)])
    original, converted = _tensors(tmp_path / "hf"), _tensors(out)
    if tie:
        original.pop("lm_head.weight", None)
    assert sorted(converted) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(converted[name], tensor), name
    written = json.loads((out / "config.json").read_text())
    assert (written["vocab_size"], written["num_key_value_heads"], written["tie_word_embeddings"]) == (VOCAB, 2, tie)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, hf(tokens).logits, atol=0, rtol=0)


def test_megagrow_to_hf_gives_megagrow_logits(tmp_path, single_process):
    config = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                         vocab_size=VOCAB, seq_length=32, rope_theta=5000.0, make_vocab_size_divisible_by=16)
    model = LlamaModel(config, seed=7).eval()
    ckpt, out = str(tmp_path / "ckpt"), tmp_path / "hf"
    # Exercise the multi-file output: each layer's tensors overflow a 0.0001 GB file.
    save_sharded(ckpt, 0, config, reader_from_state_dict(_full_state(model, config), config), tp=1, pp=1,
                 progress=False)
    convert(["to-hf", "--load", ckpt, "--save", str(out), "--max-shard-size", "0.0001"])
    assert (out / "model.safetensors.index.json").is_file()
    hf = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-4, rtol=0)


def _full_state(model: LlamaModel, config: ModelConfig) -> dict:
    state_dict = dict(model.state_dict())
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in state_dict:
            state_dict[name] = state_dict[name][:config.vocab_size]
    return state_dict


@pytest.mark.parametrize("overrides, message", [
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 32}), "rope"),
    (dict(attention_bias=True), "attention_bias is true"),
    (dict(head_dim=32), "head_dim 32 differs"),
])
def test_unrepresentable_hf_configs_are_refused_with_one_line(tmp_path, capsys, overrides, message):
    hf_dir = _save_hf(_hf_model(False, **overrides), tmp_path / "hf")
    capsys.readouterr()  # drop HF's own output
    with pytest.raises(SystemExit) as exit_info:
        convert(["from-hf", "--load", hf_dir, "--save", str(tmp_path / "ckpt")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "cannot represent" in lines[0], lines
    assert not (tmp_path / "ckpt").exists()


def test_missing_directories_fail_with_one_line(tmp_path, capsys):
    for argv in (["from-hf", "--load", str(tmp_path / "nope"), "--save", str(tmp_path / "c")],
                 ["to-hf", "--load", str(tmp_path / "nope"), "--save", str(tmp_path / "h")]):
        with pytest.raises(SystemExit):
            convert(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "not found" in lines[0] and "nope" in lines[0], lines
