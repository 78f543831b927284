"""Weighted blends of GPT datasets (`--data-path 0.7 code 0.3 prose`), sample for sample as megatron-core 0.16 blends them.

`--data-path` takes either one dataset prefix, or weight/prefix pairs. Instead of
the list it may name a file as `--data-path @mix.txt`, one `weight prefix` pair
per line; `#` starts a comment, blank lines are skipped, and relative prefixes
are resolved against the file's directory so a mix file can live beside its data.
Weights are normalised to sum to 1.

For a split of N samples, dataset d contributes its share ceil(N * w_d); the blend
holds the sum of the shares (at least N), and dataset d is asked for
ceil(share_d * 1.005) samples, so the order below never runs it dry. The order
(`--blend-rule`):

- megatron (default): sample k comes from the dataset with the largest lag
  w_d * max(k, 1) - count_d, ties to the lowest index — megatron-core's rule, so
  the same prefixes, weights, seed and split give megatron-core's samples.
- tijdeman: Tijdeman's rule (see csrc/helpers.cpp), which keeps every prefix of
  the stream within one sample of the weights for any number of datasets;
  megatron-core's rule drifts further with three or more datasets (with weights
  3:99:7:99 the first 15 samples hold 1.14 samples too many of the last dataset).

A split of no given size (None) blends as many samples as the datasets' single
epochs hold before the first runs out (megatron-core refuses weights without a
size). Datasets of weight 0 are never read. The two blend arrays are built in C++
and cached by `index_cache`, like the GPT indices.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from megagrow.config import BLEND_RULES
from megagrow.data import index_cache
from megagrow.data.gpt_dataset import SPLIT_NAMES, GPTDataset, GPTDatasetConfig, build_gpt_datasets, normalise
from megagrow.data.indexed_dataset import dataset_exists
from megagrow.data.native import build_blending_indices
from megagrow.errors import UserError

INDEX_NAMES = ("dataset_index", "dataset_sample_index")
# Extra share of samples each dataset builds beyond its share of the blend (megatron-core's
# mid_level_dataset_surplus), so the blending order never runs it dry.
SAMPLE_SURPLUS = 0.005


@dataclasses.dataclass(frozen=True)
class BlendComponent:
    """One dataset of a blend: its normalised weight and its `.bin/.idx` prefix."""

    weight: float
    prefix: str


def domain_names(components: Sequence[BlendComponent]) -> list[str]:
    """Short, unique names for a blend's datasets (file name without `_text_document`), for per-domain metrics."""
    names = []
    for component in components:
        name = Path(component.prefix).name
        for suffix in ("_text_document", "_document"):
            if name.endswith(suffix) and len(name) > len(suffix):
                name = name[: -len(suffix)]
                break
        names.append(name)
    if len(set(names)) < len(names):  # same file name in different directories
        names = [f"{name}_{i}" for i, name in enumerate(names)]
    return names


def parse_data_path(items: Sequence[str], flag: str = "--data-path") -> list[BlendComponent]:
    """Components from `[prefix]`, `[w1, p1, w2, p2, ...]` or `[@file]`, weights normalised, prefixes checked."""
    items = list(items)
    if len(items) == 1 and items[0].startswith("@"):
        return _normalise(_read_data_path_file(Path(items[0][1:])))
    if not items:
        raise UserError(f"{flag}: no dataset given; pass a prefix, weight/prefix pairs, or @file")
    if len(items) == 1:
        return _normalise([(1.0, items[0], flag)])
    if len(items) % 2:
        raise UserError(
            f"{flag}: {len(items)} values; a blend is weight/prefix pairs, e.g. {flag} 0.7 data/a 0.3 data/b"
        )
    pairs = [(_weight(w, f"{flag} weight {w!r}"), p, flag) for w, p in zip(items[::2], items[1::2])]
    return _normalise(pairs)


def _read_data_path_file(path: Path) -> list[tuple[float, str, str]]:
    """(weight, prefix, where) for each `weight prefix` line of a mix file."""
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise UserError(f"--data-path @{path}: cannot read the mix file ({err.strerror or err})") from err
    pairs = []
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        where = f"{path}:{number}"
        fields = text.split(maxsplit=1)
        if len(fields) != 2:
            raise UserError(f"{where}: expected 'weight prefix', got {text!r}")
        prefix = fields[1] if os.path.isabs(fields[1]) else str(path.parent / fields[1])
        pairs.append((_weight(fields[0], f"{where}: weight {fields[0]!r}"), prefix, where))
    if not pairs:
        raise UserError(f"--data-path @{path}: the mix file lists no datasets; add 'weight prefix' lines")
    return pairs


def write_data_path_file(path: str | os.PathLike, weights: Sequence[float], prefixes: Sequence[str],
                         comment: str = "") -> None:
    """Write a mix file for `--data-path @path`: one `weight prefix` line per dataset, prefixes made absolute."""
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [f"{w:.6f} {os.path.abspath(p)}" for w, p in zip(weights, prefixes)]
    try:
        Path(path).write_text("\n".join(lines) + "\n")
    except OSError as err:
        raise UserError(f"{path}: cannot write the mix file ({err.strerror or err}); check the directory") from None


def _weight(text: str, where: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        example = "e.g. 0.7 data/a 0.3 data/b"
        raise UserError(f"{where} is not a number; a blend is weight/prefix pairs, {example}") from None
    if not math.isfinite(weight) or weight < 0:
        raise UserError(f"{where} must be a finite number >= 0")
    return weight


def _normalise(pairs: list[tuple[float, str, str]]) -> list[BlendComponent]:
    """Check every prefix exists and scale the weights to sum to 1."""
    missing = [f"{prefix} ({where})" for _, prefix, where in pairs if not dataset_exists(prefix)]
    if missing:
        raise UserError(
            f"dataset not found: {', '.join(missing)}; pass prefixes without .bin/.idx, "
            f"as written by tools/preprocess_data.py"
        )
    if sum(weight for weight, _, _ in pairs) <= 0:
        raise UserError(f"blend weights ({pairs[0][2]}) sum to 0; give at least one dataset a positive weight")
    weights = normalise([weight for weight, _, _ in pairs])
    return [BlendComponent(weight, prefix) for weight, (_, prefix, _) in zip(weights, pairs)]


def blend_shares(weights: Sequence[float], num_samples: int | None) -> list[int | None]:
    """Samples of each dataset in a blend asked for num_samples: ceil(num_samples * w_d) (None stays None)."""
    if num_samples is None:
        return [None] * len(weights)
    return [math.ceil(num_samples * weight) for weight in weights]


def blend_sample_counts(weights: Sequence[float], num_samples: int | None) -> list[int | None]:
    """Samples to build from each dataset for a blend asked for num_samples: its share plus the surplus."""
    return [None if share is None else math.ceil(share * (1 + SAMPLE_SURPLUS))
            for share in blend_shares(weights, num_samples)]


def check_blend_rule(rule: str) -> None:
    """Refuse an unknown blending rule in one line naming the flag."""
    if rule not in BLEND_RULES:
        raise UserError(f"--blend-rule {rule!r}: choose one of {', '.join(BLEND_RULES)}")


class BlendedDataset(index_cache.PicklesByCacheLocation, torch.utils.data.Dataset):
    """`size` samples drawn from `datasets` in the blending order of `rule`; items carry their dataset_id.

    The weights are normalised here again, as megatron-core's BlendedDataset does, so
    the order sees the same bits. size None: as many samples as the datasets hold
    before the first one runs out. A dataset of weight 0 is never read and may be None.
    """

    index_names = INDEX_NAMES

    def __init__(
        self,
        datasets: Sequence[GPTDataset | None],
        weights: Sequence[float],
        size: int | None,
        cache_dir: str | os.PathLike,
        label: str = "",
        rule: str = "megatron",
    ):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        check_blend_rule(rule)
        self.datasets = list(datasets)
        self.weights = np.asarray(normalise(weights), dtype=np.float64)
        self.rule = rule
        lengths = [len(d) if d is not None else 0 for d in self.datasets]
        description = {
            "datasets": [d.cache_key if d is not None else None for d in self.datasets],
            "weights": self.weights.tolist(),
            "size": size,
            "blend_rule": rule,
        }
        self.cache_key = index_cache.cache_key("blend", description)
        self.cache_dir = Path(cache_dir)
        indices = index_cache.load_or_build(
            cache_dir,
            "blend",
            description,
            INDEX_NAMES,
            lambda: _blending_indices(self.weights, size, lengths, rule),
            label=label,
        )
        self.dataset_index, self.dataset_sample_index = (indices[name] for name in INDEX_NAMES)
        if size is not None and len(self.dataset_index) < size:
            raise RuntimeError(
                f"blend of {size} samples runs out after {len(self.dataset_index)}: "
                f"its datasets hold {lengths} samples for weights {self.weights.tolist()}"
            )

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} outside blend of {len(self)} samples")
        dataset_id = int(self.dataset_index[idx])
        sample = self.datasets[dataset_id][int(self.dataset_sample_index[idx])]
        return {**sample, "dataset_id": dataset_id}


def _blending_indices(weights: np.ndarray, size: int | None, lengths: Sequence[int],
                      rule: str) -> dict[str, np.ndarray]:
    """The blend order, cut before the first sample a dataset cannot provide."""
    if size is None:
        size = int(min(n / w for n, w in zip(lengths, weights) if w > 0))
    dataset_index, dataset_sample_index = build_blending_indices(weights, size, rule)
    available = np.asarray(lengths, dtype=np.int64)[dataset_index]
    runs_out = np.flatnonzero(dataset_sample_index >= available)
    if len(runs_out):
        dataset_index, dataset_sample_index = dataset_index[: runs_out[0]], dataset_sample_index[: runs_out[0]]
    return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}


def build_blended_datasets(
    data_path: Sequence[str], config: GPTDatasetConfig, num_samples: Sequence[int | None],
    blend_rule: str = "megatron",
) -> list[torch.utils.data.Dataset | None]:
    """Train, valid and test datasets for a `--data-path` value: plain GPT datasets for one prefix, else blends.

    A blend asked for N samples holds sum_d ceil(N * w_d) of them, as megatron-core's does.
    """
    check_blend_rule(blend_rule)
    components = parse_data_path(data_path)
    if len(components) == 1:
        return build_gpt_datasets(components[0].prefix, config, num_samples)
    weights = [c.weight for c in components]
    counts = [blend_sample_counts(weights, size) for size in num_samples]  # counts[split][d]
    per_prefix = [  # per_prefix[d][split]
        build_gpt_datasets(c.prefix, config, [split_counts[d] for split_counts in counts])
        for d, c in enumerate(components)
    ]
    cache_dir = config.cache_dir(components[0].prefix)
    blends = []
    for split, (name, size) in enumerate(zip(SPLIT_NAMES, num_samples)):
        datasets = [per_prefix[d][split] for d in range(len(components))]
        if all(d is None for d in datasets):
            blends.append(None)
            continue
        length = None if size is None else sum(blend_shares(weights, size))
        label = f"the {name} split of {len(components)} datasets ({length if length is not None else 'all'} samples)"
        blends.append(BlendedDataset(datasets, weights, length, cache_dir, label=label, rule=blend_rule))
    return blends
