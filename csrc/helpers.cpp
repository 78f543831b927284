// Index builders for the GPT and blended datasets.
//
// Both are sequential scans over arrays with hundreds of millions of entries at
// cluster scale; in Python they take minutes, here a fraction of a second. The
// GIL is released while scanning so other rank threads (e.g. a progress logger)
// keep running.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// Walks the epoch-concatenated document stream and records, for every sample,
// the (position in doc_idx, token offset in that document) where it starts.
// Row i+1 is where sample i ends: consecutive samples share one boundary token
// because a sample of seq_length + 1 tokens yields seq_length (input, label)
// pairs.
template <typename IndexT, typename DocT>
py::array_t<IndexT> build_sample_idx_impl(const py::array_t<int32_t>& sizes_arr,
                                          const py::array_t<DocT>& doc_idx_arr,
                                          int64_t seq_length, int64_t num_samples) {
  const int32_t* sizes = sizes_arr.data();
  const DocT* doc_idx = doc_idx_arr.data();
  const int64_t num_sizes = sizes_arr.size();
  const int64_t num_docs = doc_idx_arr.size();

  py::array_t<IndexT> result({num_samples + 1, static_cast<int64_t>(2)});
  IndexT* out = result.mutable_data();

  std::string error;
  {
    py::gil_scoped_release release;
    int64_t doc_pos = 0;     // index into doc_idx
    int64_t doc_offset = 0;  // tokens of doc_idx[doc_pos] already consumed
    out[0] = 0;
    out[1] = 0;
    for (int64_t sample = 1; sample <= num_samples && error.empty(); ++sample) {
      int64_t remaining = seq_length + 1;
      while (remaining != 0) {
        if (doc_pos >= num_docs) {
          error = "build_sample_idx: documents hold too few tokens for " +
                  std::to_string(num_samples) + " samples of " +
                  std::to_string(seq_length) + " tokens";
          break;
        }
        const int64_t doc_id = static_cast<int64_t>(doc_idx[doc_pos]);
        if (doc_id < 0 || doc_id >= num_sizes) {
          error = "build_sample_idx: doc_idx entry " + std::to_string(doc_id) +
                  " is outside sizes (length " + std::to_string(num_sizes) + ")";
          break;
        }
        const int64_t doc_left = sizes[doc_id] - doc_offset;
        remaining -= doc_left;
        if (remaining <= 0) {
          // The sample ends inside this document; the boundary token (the
          // last label) is shared with the next sample, hence the -1.
          doc_offset += remaining + doc_left - 1;
          remaining = 0;
        } else {
          ++doc_pos;
          doc_offset = 0;
        }
      }
      out[2 * sample] = static_cast<IndexT>(doc_pos);
      out[2 * sample + 1] = static_cast<IndexT>(doc_offset);
    }
  }
  if (!error.empty()) throw std::invalid_argument(error);
  return result;
}

template <typename DocT>
py::array build_sample_idx_dispatch(const py::array_t<int32_t>& sizes,
                                    const py::array_t<DocT>& doc_idx, int64_t seq_length,
                                    int64_t num_samples) {
  // int32 halves the index size when every value fits, as it does below
  // ~2^31 documents and tokens per document.
  const bool fits32 = static_cast<int64_t>(doc_idx.size()) < std::numeric_limits<int32_t>::max();
  if (fits32) return build_sample_idx_impl<int32_t, DocT>(sizes, doc_idx, seq_length, num_samples);
  return build_sample_idx_impl<int64_t, DocT>(sizes, doc_idx, seq_length, num_samples);
}

py::array build_sample_idx(py::array sizes_any, py::array doc_idx_any, int64_t seq_length,
                           int64_t num_samples) {
  if (seq_length <= 0) throw std::invalid_argument("build_sample_idx: seq_length must be > 0");
  if (num_samples < 0) throw std::invalid_argument("build_sample_idx: num_samples must be >= 0");
  auto sizes = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(sizes_any);
  if (!sizes) throw std::invalid_argument("build_sample_idx: sizes must be an int32 array");
  if (py::isinstance<py::array_t<int64_t>>(doc_idx_any)) {
    auto doc_idx = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(doc_idx_any);
    return build_sample_idx_dispatch<int64_t>(sizes, doc_idx, seq_length, num_samples);
  }
  auto doc_idx = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(doc_idx_any);
  if (!doc_idx) throw std::invalid_argument("build_sample_idx: doc_idx must be an integer array");
  return build_sample_idx_dispatch<int32_t>(sizes, doc_idx, seq_length, num_samples);
}

// ---------------------------------------------------------------------------------------------
// Blending: which dataset each of `size` samples comes from (int16) and which of that dataset's
// samples it is (int64, counting up per dataset). Datasets of weight 0 are never chosen
// (megatron-core refuses them); the others are ordered as if those were absent.

// The largest of lag[First, First + N) as a tournament: log2(N) rounds of branch-free pairwise
// picks instead of a chain of N - 1. The left half holds the lower indices and the right half
// wins only when strictly ahead, so among equal lags the lowest index wins, as in a
// left-to-right scan. Returns the winner's index and its count.
struct Leader {
  double lag, count;
  int index;
};

template <int First, int N>
inline Leader leader(const double* lag, const double* count) {
  if constexpr (N == 1) {
    return {lag[First], count[First], First};
  } else {
    const Leader left = leader<First, N / 2>(lag, count);
    const Leader right = leader<First + N / 2, N - N / 2>(lag, count);
    const bool ahead = right.lag > left.lag;
    return {ahead ? right.lag : left.lag, ahead ? right.count : left.count,
            ahead ? right.index : left.index};
  }
}

// Megatron-core's rule (0.16, helpers.cpp build_blending_indices): sample k goes to the dataset
// with the largest lag w_d * max(k, 1) - count_d, ties to the lowest index. The products and
// differences are the same float64 operations as there (no FMA: setup.py passes
// -ffp-contract=off), so the order is bit-identical to megatron-core's. The speed comes from
// the loop's shape, not a different formula: the lags are compared branch-free (the winner is
// unpredictable, so a branch mispredicts on most samples), the counts live in registers as
// doubles (exact below 2^53: no int->double conversion per dataset and sample), and max(k, 1)
// becomes a double counter after the first sample.
template <int D>
void blend_megatron_fixed(const double* w, const int16_t* ids, int64_t size, int16_t* ds,
                          int64_t* ds_sample) {
  double count[D];
  for (int d = 0; d < D; ++d) count[d] = 0.0;
  double t = 1.0;  // max(k, 1)
  for (int64_t k = 0; k < size; ++k) {
    double lag[D];
    for (int d = 0; d < D; ++d) lag[d] = w[d] * t - count[d];
    const Leader best = leader<0, D>(lag, count);
    ds[k] = ids[best.index];
    ds_sample[k] = static_cast<int64_t>(best.count);
    for (int d = 0; d < D; ++d) count[d] += d == best.index ? 1.0 : 0.0;
    t = k == 0 ? 1.0 : t + 1.0;
  }
}

// Any number of datasets: the same rule as a plain loop over the counts in memory.
void blend_megatron_any(const double* w, const int16_t* ids, int64_t num, int64_t size,
                        int16_t* ds, int64_t* ds_sample) {
  std::vector<double> count(num, 0.0);
  double t = 1.0;
  for (int64_t k = 0; k < size; ++k) {
    int64_t best = 0;
    double best_lag = w[0] * t - count[0];
    for (int64_t d = 1; d < num; ++d) {
      const double lag = w[d] * t - count[d];
      if (lag > best_lag) {
        best_lag = lag;
        best = d;
      }
    }
    ds[k] = ids[best];
    ds_sample[k] = static_cast<int64_t>(count[best]);
    count[best] += 1.0;
    t = k == 0 ? 1.0 : t + 1.0;
  }
}

void blend_megatron(const std::vector<double>& w, const std::vector<int16_t>& ids, int64_t size,
                    int16_t* ds, int64_t* ds_sample) {
  // Beyond 6 datasets the weights and counts no longer fit the 16 SSE registers together; the
  // branch-free kernel then spills and the plain loop is faster (measured up to 12 datasets).
  switch (w.size()) {
    case 1: return blend_megatron_fixed<1>(w.data(), ids.data(), size, ds, ds_sample);
    case 2: return blend_megatron_fixed<2>(w.data(), ids.data(), size, ds, ds_sample);
    case 3: return blend_megatron_fixed<3>(w.data(), ids.data(), size, ds, ds_sample);
    case 4: return blend_megatron_fixed<4>(w.data(), ids.data(), size, ds, ds_sample);
    case 5: return blend_megatron_fixed<5>(w.data(), ids.data(), size, ds, ds_sample);
    case 6: return blend_megatron_fixed<6>(w.data(), ids.data(), size, ds, ds_sample);
    default: return blend_megatron_any(w.data(), ids.data(), w.size(), size, ds, ds_sample);
  }
}

// Tijdeman's rule for the "chairman assignment" problem (megagrow's --blend-rule tijdeman). With
// k datasets of positive weight and c = 1 / (2k - 2), sample t (1-based) goes, among the
// datasets whose lag w_d * t - count_d is at least c, to the one whose next sample is due
// soonest, i.e. with the smallest (1 - c + count_d) / w_d. Every prefix of n samples then holds
// |count_d - w_d * n| <= 1 - c < 1 samples of each dataset; megatron-core's rule can drift more
// than one sample with 3 or more datasets (weights 3:99:7:99: by 1.14 samples after 15).
// Ties go to the lowest dataset index, which keeps the result deterministic.
void blend_tijdeman(const std::vector<double>& w, const std::vector<int16_t>& ids, int64_t size,
                    int16_t* ds, int64_t* ds_sample) {
  const int64_t num = static_cast<int64_t>(w.size());
  const double c = num > 1 ? 1.0 / static_cast<double>(2 * num - 2) : 0.0;
  std::vector<int64_t> counts(num, 0);
  for (int64_t k = 0; k < size; ++k) {
    const double t = static_cast<double>(k + 1);
    int64_t best = -1, most_behind = -1;
    double best_due = 0.0, most_lag = 0.0;
    for (int64_t d = 0; d < num; ++d) {
      const double count = static_cast<double>(counts[d]);
      const double lag = w[d] * t - count;
      if (most_behind < 0 || lag > most_lag) {
        most_lag = lag;
        most_behind = d;
      }
      if (lag >= c) {
        const double due = (1.0 - c + count) / w[d];
        if (best < 0 || due < best_due) {
          best_due = due;
          best = d;
        }
      }
    }
    if (best < 0) best = most_behind;  // only reachable through rounding of lag near c
    ds[k] = ids[best];
    ds_sample[k] = counts[best];
    ++counts[best];
  }
}

py::tuple build_blending_indices(const py::array_t<double, py::array::c_style | py::array::forcecast>& weights_arr,
                                 int64_t size, const std::string& rule) {
  const int64_t num_datasets = weights_arr.size();
  if (rule != "megatron" && rule != "tijdeman")
    throw std::invalid_argument("build_blending_indices: rule must be 'megatron' or 'tijdeman', got '" + rule + "'");
  if (num_datasets <= 0) throw std::invalid_argument("build_blending_indices: no weights given");
  if (num_datasets > std::numeric_limits<int16_t>::max())
    throw std::invalid_argument("build_blending_indices: at most 32767 datasets are supported");
  if (size < 0) throw std::invalid_argument("build_blending_indices: size must be >= 0");
  const double* weights = weights_arr.data();
  double total = 0.0;
  // The datasets that can be chosen, and their indices among all datasets.
  std::vector<double> positive;
  std::vector<int16_t> ids;
  for (int64_t d = 0; d < num_datasets; ++d) {
    if (!(weights[d] >= 0.0) || weights[d] == std::numeric_limits<double>::infinity())
      throw std::invalid_argument("build_blending_indices: weights must be finite and >= 0");
    total += weights[d];
    if (weights[d] > 0.0) {
      positive.push_back(weights[d]);
      ids.push_back(static_cast<int16_t>(d));
    }
  }
  if (positive.empty() || total < 1.0 - 1e-6 || total > 1.0 + 1e-6)
    throw std::invalid_argument("build_blending_indices: weights must be normalised to sum to 1");

  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  int16_t* ds = dataset_index.mutable_data();
  int64_t* ds_sample = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    if (rule == "megatron")
      blend_megatron(positive, ids, size, ds, ds_sample);
    else
      blend_tijdeman(positive, ids, size, ds, ds_sample);
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "C++ index builders for megagrow's GPT and blended datasets";
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"),
        py::arg("seq_length"), py::arg("num_samples"),
        "(num_samples + 1, 2) array of (doc_idx position, token offset) sample boundaries");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        py::arg("rule") = "megatron",
        "(dataset_index int16[size], dataset_sample_index int64[size]) by megatron-core's or Tijdeman's rule");
}
