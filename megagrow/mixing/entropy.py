"""Entropy proxies: per-domain entropies of the token stream, and the training-free mixture they imply.

What BiMix (Ge et al., "BiMix: A Bivariate Data Mixing Law for Language Model Pretraining",
arXiv 2405.14908) says, as far as could be checked here: its abstract (v2 and v4,
https://arxiv.org/html/2405.14908v4) presents entropy measures as cheap proxies for choosing a
mixture, and reports that such training-free mixtures do as well as or better than methods
that need training runs.
The stored copies of the paper reachable from this workplace hold only its opening
(abstract and introduction), so the section that defines the proxies could NOT be read.
DESIGN.md (section "Data mixing") states that the paper turns per-domain entropies into
proportions by normalisation and finds the conditional entropy best; that is unverified
here and is what we follow by default.

What we chose:
- Three proxies per domain, all plug-in (maximum-likelihood) estimates in nats, the unit of
  the training loss: H(X_t), H(X_{t+1} | X_t) and H(X_t, X_{t+1}).
- All three come from one population: the adjacent token pairs inside a document. H(X_t) is
  the marginal of the first token of those pairs, so the chain rule
  H(X_t, X_{t+1}) = H(X_t) + H(X_{t+1} | X_t) holds exactly for the estimates (a unigram
  over every token would differ by the last token of each document).
- Pairs never cross a document boundary: the sample puts documents side by side in a random
  order, so a pair spanning two of them is an artefact of sampling, not of the text. Counting
  it would inflate the conditional entropy most for domains of short documents.
- Proportions: `normalise` (r_i = H_i / sum_j H_j, the default, invariant to the log base) or
  `softmax` (r_i proportional to exp(H_i / T), which depends on the unit: nats here).
- Plug-in entropies are biased low, at least by (distinct outcomes - 1) / (2 * samples) and far
  more while the pair distribution is undersampled: for i.i.d. Zipf tokens over 32k ids (true
  H(X_{t+1}|X_t) = H(X_t) = 7.3 nats) the estimate is 5.0 nats at 1M tokens and 6.1 at 10M.
  So compare domains at one sample size (`max_tokens`, 10M by default in the tool) and read
  the proxies as relative, not absolute, numbers.

Counting is vectorised numpy: a pair (a, b) is encoded as the int64 a * V + b and counted with
a sort (np.unique); memory is O(sample), independent of the vocabulary (no V x V table). On
the development machine (2 shared cores) sampling and counting run at 10-15M tokens/s for a
1M-token sample of a 32k vocabulary, the sort being ~90% of it, so a C++ hash map would not pay
for a second implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tqdm import tqdm

from megagrow.data.indexed_dataset import IndexedDataset

PROXIES = ("unigram", "conditional", "joint")
MAPPINGS = ("normalise", "softmax")


@dataclass(frozen=True)
class TokenSample:
    """Whole documents drawn from a dataset, back to back, and where each one starts."""

    tokens: np.ndarray  # 1-D token ids of the sampled documents, concatenated
    document_starts: np.ndarray  # int64 offset of each sampled document in `tokens`, ascending

    @property
    def num_documents(self) -> int:
        """Documents in the sample (the last one may be cut to fit the budget)."""
        return len(self.document_starts)


@dataclass(frozen=True)
class EntropyEstimates:
    """Plug-in entropies, in nats, of the in-document token pairs (X_t, X_{t+1}) of one sample."""

    unigram_nats: float  # H(X_t)
    conditional_nats: float  # H(X_{t+1} | X_t)
    joint_nats: float  # H(X_t, X_{t+1})
    tokens: int  # tokens in the sample
    documents: int  # documents in the sample
    pairs: int  # in-document token pairs counted
    distinct_tokens: int  # distinct first tokens of those pairs
    distinct_pairs: int  # distinct pairs

    def proxy(self, name: str) -> float:
        """The entropy named by a proxy ('unigram', 'conditional' or 'joint'), in nats."""
        if name not in PROXIES:
            raise ValueError(f"unknown entropy proxy {name!r}; choose one of {', '.join(PROXIES)}")
        return getattr(self, f"{name}_nats")


def token_sample(dataset: IndexedDataset, max_tokens: int, seed: int = 0, progress: bool = False) -> TokenSample:
    """Whole documents in a seeded random order until `max_tokens` (the last one cut to fit); the same for a seed."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    # A permutation over all documents, rather than a prefix of the file, so that a dataset
    # written source by source (e.g. all of one repository, then the next) is sampled evenly.
    order = np.random.default_rng(seed).permutation(dataset.num_documents)
    pieces, starts, taken = [], [], 0
    bar = tqdm(total=min(max_tokens, dataset.num_tokens), unit="tok", unit_scale=True, disable=None if progress else True, leave=False)
    for document_id in order:
        tokens = dataset.document(int(document_id))[: max_tokens - taken]
        if tokens.size == 0:
            continue
        pieces.append(tokens)
        starts.append(taken)
        taken += tokens.size
        bar.update(tokens.size)
        if taken >= max_tokens:
            break
    bar.close()
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dataset.dtype)
    return TokenSample(tokens, np.asarray(starts, dtype=np.int64))


def in_document_pairs(sample: TokenSample) -> tuple[np.ndarray, np.ndarray]:
    """(first, second) int64 token ids of every adjacent pair that lies inside one document."""
    tokens = sample.tokens.astype(np.int64, copy=False)
    if tokens.size < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    # Pair i is (tokens[i], tokens[i + 1]); it crosses a boundary when i + 1 starts a document.
    keep = np.ones(tokens.size - 1, dtype=bool)
    boundaries = sample.document_starts[sample.document_starts > 0]
    keep[boundaries - 1] = False
    return tokens[:-1][keep], tokens[1:][keep]


def _plugin_entropy(counts: np.ndarray, total: int) -> float:
    """Entropy in nats of the empirical distribution `counts / total` (counts all positive)."""
    p = counts / total
    return float(-(p * np.log(p)).sum())


def estimate_entropies(sample: TokenSample) -> EntropyEstimates:
    """Unigram, conditional and joint entropies (nats) of the sample's in-document token pairs."""
    first, second = in_document_pairs(sample)
    if first.size == 0:
        raise ValueError("the sample has no document of two or more tokens, so no token pair to count")
    if min(int(first.min()), int(second.min())) < 0:
        raise ValueError("token ids must be non-negative")
    # int64 holds a * V + b for any id below 2**31, i.e. every Megatron token dtype; below a
    # 65536-token vocabulary (uint16 datasets) uint32 holds it too and sorts ~1.6x faster.
    vocab = max(int(first.max()), int(second.max())) + 1
    keys = first * vocab + second
    if vocab * vocab <= 2**32:
        keys = keys.astype(np.uint32)
    pair_keys, pair_counts = np.unique(keys, return_counts=True)
    # Keys are sorted, so pairs sharing a first token are adjacent: group them without a
    # vocabulary-sized array.
    pair_first = pair_keys.astype(np.int64) // vocab
    group_starts = np.concatenate(([0], np.flatnonzero(np.diff(pair_first)) + 1))
    first_counts = np.add.reduceat(pair_counts, group_starts)
    first_count_of_pair = np.repeat(first_counts, np.diff(np.append(group_starts, pair_counts.size)))

    total = first.size
    joint = _plugin_entropy(pair_counts, total)
    unigram = _plugin_entropy(first_counts, total)
    # Computed from the conditional distributions themselves, not as joint - unigram, so the
    # chain rule is a check on the counting rather than true by construction.
    conditional = float(-(pair_counts / total * np.log(pair_counts / first_count_of_pair)).sum())
    return EntropyEstimates(
        unigram_nats=unigram,
        conditional_nats=conditional,
        joint_nats=joint,
        tokens=int(sample.tokens.size),
        documents=sample.num_documents,
        pairs=int(total),
        distinct_tokens=int(first_counts.size),
        distinct_pairs=int(pair_counts.size),
    )


def dataset_entropies(dataset: IndexedDataset, max_tokens: int, seed: int = 0, progress: bool = False) -> EntropyEstimates:
    """Entropies of a deterministic sample of up to `max_tokens` tokens of a dataset."""
    return estimate_entropies(token_sample(dataset, max_tokens, seed, progress))


def mixture_from_entropies(values: Sequence[float], mapping: str = "normalise", temperature: float = 1.0) -> np.ndarray:
    """Domain proportions (summing to 1) from one entropy per domain: H_i / sum H, or softmax(H / temperature)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("give one entropy per domain")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"entropies must be finite and non-negative, got {values.tolist()}")
    if mapping == "normalise":
        total = values.sum()
        if total <= 0:
            raise ValueError("every entropy is 0 (each domain repeats one token), so normalising them is undefined")
        return values / total
    if mapping == "softmax":
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"softmax temperature must be positive, got {temperature}")
        logits = values / temperature
        weights = np.exp(logits - logits.max())
        return weights / weights.sum()
    raise ValueError(f"unknown mapping {mapping!r}; choose one of {', '.join(MAPPINGS)}")
