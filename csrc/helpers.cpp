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

// Blending by Tijdeman's rule for the "chairman assignment" problem. With k datasets of
// positive weight and c = 1 / (2k - 2), sample t (1-based) goes, among the datasets whose
// lag w_d * t - count_d is at least c, to the one whose next sample is due soonest, i.e.
// with the smallest (1 - c + count_d) / w_d. Every prefix of n samples then holds
// |count_d - w_d * n| <= 1 - c < 1 samples of each dataset. Megatron's plain rule
// (argmax of the lag) is simpler but can fall more than one sample behind with 4 or more
// datasets (weights 3:99:7:99 after 166 samples), so it does not give that guarantee.
// Ties go to the lowest dataset index, which keeps the result deterministic.
py::tuple build_blending_indices(const py::array_t<double, py::array::c_style | py::array::forcecast>& weights_arr,
                                 int64_t size) {
  const int64_t num_datasets = weights_arr.size();
  if (num_datasets <= 0) throw std::invalid_argument("build_blending_indices: no weights given");
  if (num_datasets > std::numeric_limits<int16_t>::max())
    throw std::invalid_argument("build_blending_indices: at most 32767 datasets are supported");
  if (size < 0) throw std::invalid_argument("build_blending_indices: size must be >= 0");
  const double* weights = weights_arr.data();
  double total = 0.0;
  int64_t positive = 0;
  for (int64_t d = 0; d < num_datasets; ++d) {
    if (!(weights[d] >= 0.0)) throw std::invalid_argument("build_blending_indices: weights must be >= 0");
    total += weights[d];
    positive += weights[d] > 0.0;
  }
  if (positive == 0 || total < 1.0 - 1e-6 || total > 1.0 + 1e-6)
    throw std::invalid_argument("build_blending_indices: weights must be normalised to sum to 1");
  const double c = positive > 1 ? 1.0 / static_cast<double>(2 * positive - 2) : 0.0;

  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  int16_t* ds = dataset_index.mutable_data();
  int64_t* ds_sample = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> counts(num_datasets, 0);
    for (int64_t k = 0; k < size; ++k) {
      const double t = static_cast<double>(k + 1);
      int64_t best = -1, most_behind = -1;
      double best_due = 0.0, most_lag = 0.0;
      for (int64_t d = 0; d < num_datasets; ++d) {
        if (weights[d] <= 0.0) continue;
        const double count = static_cast<double>(counts[d]);
        const double lag = weights[d] * t - count;
        if (most_behind < 0 || lag > most_lag) {
          most_lag = lag;
          most_behind = d;
        }
        if (lag >= c) {
          const double due = (1.0 - c + count) / weights[d];
          if (best < 0 || due < best_due) {
            best_due = due;
            best = d;
          }
        }
      }
      if (best < 0) best = most_behind;  // only reachable through rounding of lag near c
      ds[k] = static_cast<int16_t>(best);
      ds_sample[k] = counts[best];
      ++counts[best];
    }
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
        "(dataset_index int16[size], dataset_sample_index int64[size]) by Tijdeman's rule");
}
