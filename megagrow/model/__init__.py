"""The Llama model, built from tensor-parallel layers so one definition serves every tp / pp split."""
