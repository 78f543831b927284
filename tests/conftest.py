"""Session-wide pytest fixtures: the small real corpus and tiny tokenizer of tests/fixtures_text.py."""

pytest_plugins = ["fixtures_text"]
