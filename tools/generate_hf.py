"""Load an exported HF Llama directory with transformers and continue a prompt, to show the export works.

    python tools/convert_checkpoint.py to-hf --load runs/x/checkpoints --save runs/x/hf
    python tools/generate_hf.py --hf-dir runs/x/hf --tokenizer-model runs/x/tokenizer.model --prompt "def main("

The model is read by `transformers.AutoModelForCausalLM` exactly as any HF tool would read it;
the prompt is encoded with the run's tokenizer (--tokenizer-type/--tokenizer-model as in
training; the exported directory holds weights and config only). Decoding samples by default
(--temperature 0.8, --top-k 40), seeded so a run is repeatable: greedy decoding of a small model
tends to loop on its most likely token, which says little about the model. --greedy decodes
greedily. Needs the `hf` extra: pip install -e '.[hf]'.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megagrow.errors import UserError, exit_on_user_error


def _load_model(hf_dir: Path):
    """The exported model in eval mode, through transformers' own loader."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UserError("transformers is not installed; install the hf extra: pip install -e '.[hf]'") from None
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir}: no config.json; point --hf-dir at the output of convert_checkpoint.py to-hf")
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    return model.eval()


def generate(hf_dir: Path, tokenizer_model: Path, prompt: str, max_new_tokens: int, temperature: float,
             seed: int, top_k: int = 40, tokenizer_type: str = "SentencePieceTokenizer") -> tuple[str, int, str]:
    """The prompt's continuation from the HF model: (text, number of new tokens, what model transformers built).

    temperature 0 decodes greedily; otherwise tokens are sampled from the top_k most likely (0: all).
    """
    import torch

    from megagrow.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    model = _load_model(hf_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{tokenizer_model}: {tokenizer.vocab_size} pieces but the model at {hf_dir} has "
                        f"{model.config.vocab_size}; pass the tokenizer the run was trained with")
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise UserError("--prompt encodes to no tokens; give some text")
    if tokenizer.eos_id is not None:
        # Training streams documents separated by --append-eod's eos, so a new document follows an eos.
        prompt_ids = [tokenizer.eos_id, *prompt_ids]
    torch.manual_seed(seed)
    sampling = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k or None}
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.eos_id if tokenizer.eos_id is not None else 0, **sampling)
    new_ids = output[0, len(prompt_ids):].tolist()
    # Pieces past the tokenizer's vocabulary are padding rows of the embedding; a tiny model may still pick them.
    new_ids = [i for i in new_ids if i < tokenizer.vocab_size]
    config = model.config
    built = f"{type(model).__name__}, {config.num_hidden_layers} layers, hidden {config.hidden_size}"
    return tokenizer.decode(new_ids), len(new_ids), built


@exit_on_user_error
def main(argv=None) -> None:
    """Print the model's size, the prompt and its continuation."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", type=Path, required=True, help="directory written by convert_checkpoint.py to-hf")
    parser.add_argument("--tokenizer-model", type=Path, required=True,
                        help="the run's tokenizer: a SentencePiece .model, or a directory with tokenizer.json")
    parser.add_argument("--tokenizer-type", default="SentencePieceTokenizer", help="as pretrain_gpt.py's flag")
    parser.add_argument("--prompt", default="def ", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    if not args.tokenizer_model.exists():
        raise UserError(f"--tokenizer-model {args.tokenizer_model}: no such file")
    if args.temperature < 0 or args.top_k < 0:
        raise UserError("--temperature and --top-k must not be negative (use --greedy for greedy decoding)")
    text, count, built = generate(args.hf_dir, args.tokenizer_model, args.prompt, args.max_new_tokens,
                                  0.0 if args.greedy else args.temperature, args.seed, args.top_k,
                                  args.tokenizer_type)
    decoding = "greedy" if args.greedy or args.temperature == 0 else (
        f"sampled: temperature {args.temperature}, top-k {args.top_k}, seed {args.seed}")
    print(f"loaded {args.hf_dir} with transformers ({built}); decoding {decoding}")
    print(f"prompt: {args.prompt!r}")
    print(f"continuation ({count} tokens): {text!r}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
