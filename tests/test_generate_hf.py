"""tools/generate_hf.py: an HF Llama directory continues a prompt through transformers; bad inputs end in one line."""

import pytest
import torch

from fixtures_text import TINY_VOCAB_SIZE, load_tool

transformers = pytest.importorskip("transformers")
generate_hf = load_tool("generate_hf")


def _hf_dir(path, vocab_size):
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_greedy_continuation_matches_transformers_generate(tmp_path, tiny_tokenizer_model):
    hf = _hf_dir(tmp_path / "hf", TINY_VOCAB_SIZE + 8)  # padded vocabulary, as megagrow exports it
    text, count, built = generate_hf.generate(hf, tiny_tokenizer_model, "def main", 6, temperature=0.0, seed=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    from megagrow.data.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(tiny_tokenizer_model)
    prompt = [tokenizer.eos_id, *tokenizer.encode("def main")]
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(prompt):]
    kept = [i for i in expected.tolist() if i < tokenizer.vocab_size]
    assert count == len(kept) and text == tokenizer.decode(kept)
    assert built == "LlamaForCausalLM, 1 layers, hidden 32"


def test_errors_end_in_one_line(tmp_path, tiny_tokenizer_model, capsys):
    def error(*argv):
        with pytest.raises(SystemExit) as exit_info:
            generate_hf.main([str(a) for a in argv])
        assert exit_info.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "no config.json" in error("--hf-dir", tmp_path, "--tokenizer-model", tiny_tokenizer_model)
    assert "no such file" in error("--hf-dir", tmp_path, "--tokenizer-model", tmp_path / "none.model")
    small = _hf_dir(tmp_path / "small", 16)
    assert "pass the tokenizer the run was trained with" in error("--hf-dir", small, "--tokenizer-model",
                                                                  tiny_tokenizer_model)


def test_sampling_is_the_default_seeded_and_matches_transformers(tmp_path, tiny_tokenizer_model, capsys):
    hf = _hf_dir(tmp_path / "hf", TINY_VOCAB_SIZE + 8)
    text, count, _ = generate_hf.generate(hf, tiny_tokenizer_model, "def main", 12, temperature=0.8, seed=3, top_k=5)
    again = generate_hf.generate(hf, tiny_tokenizer_model, "def main", 12, temperature=0.8, seed=3, top_k=5)
    assert (text, count) == again[:2]  # seeded: repeatable
    from megagrow.data.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(tiny_tokenizer_model)
    prompt = [tokenizer.eos_id, *tokenizer.encode("def main")]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    torch.manual_seed(3)
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=True, temperature=0.8, top_k=5,
                              pad_token_id=tokenizer.eos_id)[0, len(prompt):]
    assert text == tokenizer.decode([i for i in expected.tolist() if i < tokenizer.vocab_size])
    greedy = generate_hf.generate(hf, tiny_tokenizer_model, "def main", 12, temperature=0.0, seed=3)[0]
    assert text != greedy  # sampling is not the greedy path
    generate_hf.main(["--hf-dir", str(hf), "--tokenizer-model", str(tiny_tokenizer_model), "--max-new-tokens", "4"])
    assert "decoding sampled: temperature 0.8, top-k 40, seed 1234" in capsys.readouterr().out
