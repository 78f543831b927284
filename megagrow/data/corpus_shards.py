"""Splitting a corpus over K independent preprocessing runs (a SLURM array), and knowing which are done.

Shard I of K takes a contiguous run of the sorted input files, cut so that each shard
holds about 1/K of the input bytes (every shard gets at least one file). Merging the
shards in index order therefore gives the documents in the same order as one run over
all the files. A shard's outputs are named `{prefix}_shard{I:05d}of{K:05d}_...`; once all
of them are published, a manifest `{prefix}_shard{I:05d}of{K:05d}_manifest.json` records
the input files (path and size), the settings and the counts. A rerun skips a shard
whose manifest matches its inputs and settings, so rerunning a whole array after a
failure redoes only the shards that did not finish.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np

from megagrow.data.corpus_inputs import CorpusFile
from megagrow.data.indexed_dataset import dataset_exists
from megagrow.errors import UserError

_SHARD_NAME = re.compile(r"^(?P<base>.*)_shard(?P<index>\d{5})of(?P<count>\d{5})(?P<rest>.*)$")


@dataclass(frozen=True)
class ShardSpec:
    """Shard `index` (from 0) of `count`."""

    index: int
    count: int

    @property
    def tag(self) -> str:
        """The name part that marks this shard's outputs: `shard00003of00008`."""
        return f"shard{self.index:05d}of{self.count:05d}"

    def prefix(self, output_prefix: str) -> str:
        """The output prefix of this shard's datasets and manifest."""
        return f"{output_prefix}_{self.tag}"


def shard_from_flags(num_shards: int | None, shard_index: int | None,
                     environ: Mapping[str, str] = os.environ) -> ShardSpec | None:
    """The shard this process handles: from the flags, else from a SLURM array's variables, else None (all files)."""
    in_array = "SLURM_ARRAY_TASK_COUNT" in environ and "SLURM_ARRAY_TASK_ID" in environ
    if num_shards is None and shard_index is None and not in_array:
        return None
    if num_shards is None:
        if not in_array:
            raise UserError("--shard-index needs --num-shards (or run inside a SLURM array, which sets both)")
        num_shards = int(environ["SLURM_ARRAY_TASK_COUNT"])
    if shard_index is None:
        if not in_array:
            raise UserError("--num-shards needs --shard-index (or run inside a SLURM array, which sets both)")
        # Arrays may start anywhere (--array=1-8): the shard index counts from the first task.
        shard_index = int(environ["SLURM_ARRAY_TASK_ID"]) - int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise UserError(
            f"shard index {shard_index} is not in 0..{num_shards - 1}; with a SLURM array use a contiguous "
            f"--array=0-{max(num_shards, 1) - 1} (no step), or pass --num-shards and --shard-index"
        )
    return ShardSpec(shard_index, num_shards)


def files_of_shard(files: Sequence[CorpusFile], shard: ShardSpec) -> list[CorpusFile]:
    """Shard `shard.index`'s contiguous run of `files`, balanced by bytes; every shard gets at least one file."""
    if shard.count > len(files):
        raise UserError(
            f"--num-shards {shard.count} is more than the {len(files)} input file(s); "
            f"use at most {len(files)} shards (a shard is a set of whole files)"
        )
    # Cut k falls at the file boundary nearest to k/K of the total bytes, moved so that every
    # shard keeps at least one file; sizes are read the same way by every task.
    cumulative = np.concatenate(([0], np.cumsum([f.size for f in files], dtype=np.int64)))
    cuts = [0]
    for k in range(1, shard.count):
        target = cumulative[-1] * k / shard.count
        after = int(np.searchsorted(cumulative, target, side="left"))  # first boundary at or past the target
        cut = after - 1 if after > 0 and target - cumulative[after - 1] <= cumulative[after] - target else after
        cuts.append(min(max(cut, cuts[-1] + 1), len(files) - (shard.count - k)))
    cuts.append(len(files))
    return list(files[cuts[shard.index] : cuts[shard.index + 1]])


# ------------------------------------------------------------------------------ manifest


@dataclass
class ShardManifest:
    """What a finished shard read and wrote; its presence marks the shard as complete."""

    inputs: list[list]  # [path, size] per input file, in order
    settings: dict  # the flags that shape the output (keys, tokenizer, eod, layout)
    outputs: list[str]  # dataset prefixes written
    documents: int = 0
    tokens: int = 0
    bad_lines: int = 0
    skipped_files: list[list[str]] = field(default_factory=list)  # [path, reason]


def manifest_path(shard_prefix: str) -> str:
    """Where the manifest of the shard with this output prefix lives."""
    return f"{shard_prefix}_manifest.json"


def write_manifest(path: str, manifest: ShardManifest) -> None:
    """Write the manifest atomically (a reader sees the old file, or the whole new one)."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(asdict(manifest), f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def manifest_inputs(files: Sequence[CorpusFile]) -> list[list]:
    """The manifest's record of the input files."""
    return [[f.path, f.size] for f in files]


def why_not_complete(path: str, files: Sequence[CorpusFile], settings: dict, skip_bad_files: bool) -> str | None:
    """None when the manifest at `path` shows this shard already done with these inputs and settings, else why not."""
    if not os.path.isfile(path):
        return "no manifest"
    try:
        with open(path, encoding="utf-8") as f:
            manifest = ShardManifest(**json.load(f))
    except (OSError, ValueError, TypeError) as err:
        return f"unreadable manifest ({err})"
    if manifest.inputs != manifest_inputs(files):
        return "its input files (names or sizes) changed"
    if manifest.settings != settings:
        return "its settings changed"
    if manifest.skipped_files and not skip_bad_files:
        return "it skipped unreadable files and --skip-bad-files is not given"
    missing = [p for p in manifest.outputs if not dataset_exists(p)]
    if missing:
        return f"output {missing[0]} is missing"
    return None


# ------------------------------------------------------------------------------ merging


def check_complete_shard_sets(prefixes: Sequence[str]) -> None:
    """Refuse, in one line, shard-named dataset prefixes that are not all K shards of one sharding, once each."""
    groups: dict[tuple[str, str], dict[int, list[int]]] = {}
    for prefix in prefixes:
        match = _SHARD_NAME.match(os.path.normpath(prefix))
        if match:
            key = (match["base"], match["rest"])
            groups.setdefault(key, {}).setdefault(int(match["count"]), []).append(int(match["index"]))
    for (base, rest), by_count in sorted(groups.items()):
        pattern = f"{base}_shard*{rest}"
        if len(by_count) > 1:
            counts = " and ".join(f"of{c:05d}" for c in sorted(by_count))
            raise UserError(f"{pattern}: shards of two shardings ({counts}); merge the shards of one run only")
        [(count, indices)] = by_count.items()
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        if repeated:
            raise UserError(f"{pattern}: shard {repeated[0]:05d} of {count:05d} given twice; pass each shard once")
        missing = sorted(set(range(count)) - set(indices))
        if missing:
            listed = ", ".join(f"{i:05d}" for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise UserError(
                f"{pattern}: {len(missing)} of {count} shards missing ({listed}); "
                f"rerun the preprocessing array (finished shards are skipped) before merging"
            )
