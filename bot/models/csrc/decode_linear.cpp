// Linear layers for decode steps on CPUs with AVX512-BF16: a handful of rows against weights
// that come from memory once per step.
//
// Why not oneDNN's prepacked kernel (PyTorch's mkldnn._linear_pointwise): in the model, where
// each layer's weight comes from DRAM rather than from a cache a benchmark loop keeps warm, it
// ran SmolLM2's 211 projections of a 16-row step at ~250 GFLOP/s and ~15 GB/s on one core of an
// AVX512-BF16 EPYC — neither the core's bf16 arithmetic (~500) nor its memory (~38 GB/s). This
// kernel reads a layout made for it, one 16-column block after another, each block a contiguous
// stream the prefetcher (and a software prefetch a few KB ahead) keeps in front of the
// arithmetic, and every weight vector serves all rows at once. Same sums in fp32 (the same
// rounding to bf16 at the end; oneDNN and this agree on all but ~1 in 15,000 outputs, which
// differ by one bf16 step). docs/performance.md has the figures.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define CHINWAG_LINEAR 1
#else
#define CHINWAG_LINEAR 0
#endif

namespace {

constexpr int64_t kBlock = 16;      // output columns a vector register holds (fp32)
constexpr int64_t kMaxTile = 16;    // rows a pass over a block computes (16 accumulators)
constexpr int64_t kAhead = 192;     // weight pairs' distance the software prefetch runs ahead

bool supported() { return CHINWAG_LINEAR == 1; }

// [N, K] bf16 → [ceil(N/16), K/2, 16, 2]: for each block of 16 output columns, K/2 vectors,
// each the 16 columns' weights for one pair of inputs (what vdpbf16ps multiplies). Columns past
// N are zeros, so every block is whole; K must be even.
torch::Tensor pack(const torch::Tensor& w) {
  TORCH_CHECK(supported(), "this build has no AVX512-BF16 linear kernel");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16, "a 2-D bf16 weight");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % 2 == 0, "an even number of inputs");
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  auto padded = w.new_zeros({blocks * kBlock, K});
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({blocks, kBlock, K / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

#if CHINWAG_LINEAR
// Rows [0, MT) of x (pairs of bf16 as int32, ``xs`` pairs a row) against one block of 16
// columns: MT independent accumulators, so the fused multiply-adds of one weight vector never
// wait on each other.
template <int MT>
inline void block(const int32_t* x, int64_t xs, const int32_t* wp, int64_t pairs,
                  const float* bias, uint16_t* out, int64_t os, int64_t cols) {
  __m512 acc[MT];
  const __m512 start = bias ? _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << cols) - 1), bias)
                            : _mm512_setzero_ps();
  for (int m = 0; m < MT; ++m) acc[m] = start;
  for (int64_t p = 0; p < pairs; ++p) {
    _mm_prefetch(reinterpret_cast<const char*>(wp + (p + kAhead) * kBlock), _MM_HINT_T0);
    const __m512bh w = reinterpret_cast<__m512bh>(_mm512_loadu_si512(wp + p * kBlock));
    for (int m = 0; m < MT; ++m) {
      const __m512bh xb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(x[m * xs + p]));
      acc[m] = _mm512_dpbf16_ps(acc[m], xb, w);
    }
  }
  // Round to nearest even, as PyTorch rounds fp32 to bf16.
  const __mmask16 keep = static_cast<__mmask16>((1u << cols) - 1);
  for (int m = 0; m < MT; ++m) {
    const __m256i r = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(acc[m]));
    _mm256_mask_storeu_epi16(out + m * os, keep, r);
  }
}

using BlockFn = void (*)(const int32_t*, int64_t, const int32_t*, int64_t, const float*,
                         uint16_t*, int64_t, int64_t);

template <int... MT>
constexpr auto make_table(std::integer_sequence<int, MT...>) {
  return std::array<BlockFn, sizeof...(MT)>{&block<MT + 1>...};
}
constexpr auto kBlocks = make_table(std::make_integer_sequence<int, kMaxTile>{});
#endif

// x [M, K] bf16 (contiguous) times the packed weight (pack) → [M, N] bf16, plus bias (fp32,
// [N]) when given. Blocks of columns are split between PyTorch's threads; within a block, rows
// go 16 at a time, the later passes reading the block from L1/L2.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t N,
                     const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(supported(), "this build has no AVX512-BF16 linear kernel");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kBFloat16,
              "contiguous 2-D bf16 input");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kBlock && packed.size(3) == 2 &&
                  packed.is_contiguous() && packed.scalar_type() == torch::kBFloat16,
              "a weight from pack()");
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0), pairs = packed.size(1);
  TORCH_CHECK(K == 2 * pairs, "input size ", K, " against the weight's ", 2 * pairs);
  TORCH_CHECK(N > (blocks - 1) * kBlock && N <= blocks * kBlock, "output size ", N);
  const float* bp = nullptr;
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(torch::kFloat).contiguous();
    TORCH_CHECK(b.numel() == N, "bias of ", b.numel(), " for ", N, " outputs");
    bp = b.data_ptr<float>();
  }
  auto out = torch::empty({M, N}, x.options());
#if CHINWAG_LINEAR
  const auto* xp = reinterpret_cast<const int32_t*>(x.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const int32_t*>(packed.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, blocks, 8, [&](int64_t first, int64_t last) {
    for (int64_t nb = first; nb < last; ++nb) {
      const int64_t cols = std::min<int64_t>(kBlock, N - nb * kBlock);
      const int32_t* w = wp + nb * pairs * kBlock;
      const float* bb = bp ? bp + nb * kBlock : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += kMaxTile) {
        const int64_t rows = std::min<int64_t>(kMaxTile, M - m0);
        kBlocks[rows - 1](xp + m0 * pairs, pairs, w, pairs, bb, op + m0 * N + nb * kBlock, N,
                          cols);
      }
    }
  });
#endif
  return out;
}

}  // namespace

void register_linear(pybind11::module& m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;  // see the module's note
  m.def("linear_supported", &supported, "whether this build has the AVX512-BF16 linear kernel");
  m.def("pack_linear", &pack, "a bf16 weight [N, K] in the layout linear() reads", release());
  m.def("linear", &linear, "x [M, K] bf16 times a packed weight (+ bias) → [M, N] bf16",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("out_features"),
        pybind11::arg("bias") = pybind11::none(), release());
}
