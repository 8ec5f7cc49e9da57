// One decode step's attention on the CPU: each row's new query heads against its cached keys
// and values, read in place (bf16, fp16 or fp32), scores and sums in fp32.
//
// Why not PyTorch's scaled_dot_product_attention: its CPU flash kernel tiles the queries, and a
// decode step has one query per head (three per KV head once grouped), so it spends its time
// setting up tiles: 232 us a layer for 16 rows x 120 cached tokens on one core, where reading
// the cache takes ~60 (docs/performance.md). Built by bot/models/kernels.py for the CPU it runs
// on (-march=native); every failure to build leaves PyTorch's kernel in place.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// Query heads sharing one KV head (SmolLM2 3, Llama 3 4-8); sized 16, every step ran 1.6x slower.
constexpr int64_t kMaxGroup = 8;
constexpr int64_t kMaxDim = 256;    // head dimension
constexpr float kMasked = -1e30f;   // finite: built with -ffast-math, which assumes no infinities

// bf16 is the top half of an fp32: a shift the compiler vectorises (c10's conversion, called per
// element, ran the step 1.7x slower).
inline float to_float(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(float x) { return x; }

// Round to nearest even, as c10 does, without its per-element NaN branch (no NaN reaches here).
inline void store(uint16_t* out, float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  *out = static_cast<uint16_t>(bits >> 16);
}
inline void store(c10::Half* out, float f) { *out = static_cast<c10::Half>(f); }
inline void store(float* out, float f) { *out = f; }

// How the kernels read a tensor of Scalar: bf16 as its raw bits (see to_float), the others as
// they are.
template <typename Scalar>
using Raw = std::conditional_t<std::is_same_v<Scalar, c10::BFloat16>, uint16_t, Scalar>;

template <typename Scalar>
Raw<Scalar>* raw(const torch::Tensor& t) {
  return reinterpret_cast<Raw<Scalar>*>(t.data_ptr<Scalar>());
}

// Calls body(Scalar{}) for the dtype the kernels serve: bf16, fp16 or fp32.
template <typename Body>
void by_dtype(c10::ScalarType type, Body&& body) {
  switch (type) {
    case torch::kBFloat16: body(c10::BFloat16{}); break;
    case torch::kHalf: body(c10::Half{}); break;
    case torch::kFloat: body(float{}); break;
    default: TORCH_CHECK(false, "unsupported dtype ", type);
  }
}

// Cached rows this far ahead are asked for before they are read: each (row, KV head) is a
// separate run of the cache buffer, which the hardware prefetcher learns anew each time, and in
// the model the cache comes from memory (a 16-row step's 60 MB), not from a warm cache.
constexpr int64_t kAheadRows = 16;

template <typename T>
inline void prefetch_row(const T* p, int64_t D) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64) {
    __builtin_prefetch(c + off, 0, 3);
  }
}

// DIM > 0: the head size known when compiling (64, 128), so the inner loops unroll into whole
// vector registers (2x faster than the same loops over a run-time size); 0: any size.
template <typename Scalar, int64_t DIM>
void attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
            const torch::Tensor& mask, torch::Tensor& out) {
  using T = Raw<Scalar>;
  const int64_t B = q.size(0), KV = q.size(1), G = q.size(2), L = k.size(2);
  const int64_t runtime_dim = q.size(3);
  const T* qp = raw<Scalar>(q);
  const T* kp = raw<Scalar>(k);
  const T* vp = raw<Scalar>(v);
  const bool* mp = mask.data_ptr<bool>();
  T* op = raw<Scalar>(out);
  const int64_t ksb = k.stride(0), ksh = k.stride(1), kst = k.stride(2);
  const int64_t vsb = v.stride(0), vsh = v.stride(1), vst = v.stride(2);
  const int64_t msb = mask.stride(0);
  const float scale = 1.0f / std::sqrt(static_cast<float>(runtime_dim));
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t kRow = DIM > 0 ? DIM : kMaxDim;
    // Inside the lambda: a captured size is read through the closure and the loops stay loops.
    const int64_t D = DIM > 0 ? DIM : runtime_dim;
    std::vector<float> scores(G * L);
    for (int64_t bh = begin; bh < end; ++bh) {
      // Declared where they are used, sized by DIM: the compiler keeps them in registers.
      float qf[kMaxGroup][kRow];
      const int64_t b = bh / KV, h = bh % KV;
      const T* kb = kp + b * ksb + h * ksh;
      const T* vb = vp + b * vsb + h * vsh;
      const bool* mb = mp + b * msb;
      for (int64_t g = 0; g < G; ++g) {
        const T* qg = qp + (bh * G + g) * D;
        for (int64_t d = 0; d < D; ++d) qf[g][d] = to_float(qg[d]) * scale;
      }
      float mx[kMaxGroup];
      for (int64_t g = 0; g < G; ++g) mx[g] = kMasked;
      for (int64_t t = 0; t < L; ++t) {
        if (!mb[t]) {
          for (int64_t g = 0; g < G; ++g) scores[g * L + t] = kMasked;
          continue;
        }
        const T* kt = kb + t * kst;
        if (t + kAheadRows < L) {
          // The key this many rows on, and its value, read after the softmax: in L2 by then.
          prefetch_row(kt + kAheadRows * kst, D);
          prefetch_row(vb + (t + kAheadRows) * vst, D);
        }
        float row[kRow];
        for (int64_t d = 0; d < D; ++d) row[d] = to_float(kt[d]);
        for (int64_t g = 0; g < G; ++g) {
          float s = 0.f;
          for (int64_t d = 0; d < D; ++d) s += qf[g][d] * row[d];
          scores[g * L + t] = s;
          mx[g] = s > mx[g] ? s : mx[g];
        }
      }
      float sum[kMaxGroup];
      float acc[kMaxGroup][kRow];
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * L;
        const float m = mx[g];
        float total = 0.f;
        for (int64_t t = 0; t < L; ++t) {
          const float e = std::exp(sg[t] - m);
          sg[t] = e;
          total += e;
        }
        sum[g] = total;
        for (int64_t d = 0; d < D; ++d) acc[g][d] = 0.f;
      }
      for (int64_t t = 0; t < L; ++t) {
        if (!mb[t]) continue;
        const T* vt = vb + t * vst;
        float row[kRow];
        for (int64_t d = 0; d < D; ++d) row[d] = to_float(vt[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float w = scores[g * L + t];
          for (int64_t d = 0; d < D; ++d) acc[g][d] += w * row[d];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        // A row with nothing to attend to (all masked) gets zeros, not NaN.
        const float inv = sum[g] > 0.f && mx[g] > kMasked ? 1.f / sum[g] : 0.f;
        T* o = op + (bh * G + g) * D;
        for (int64_t d = 0; d < D; ++d) store(o + d, acc[g][d] * inv);
      }
    }
  });
}

template <typename T>
void dispatch(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
              const torch::Tensor& mask, torch::Tensor& out) {
  switch (q.size(3)) {
    case 64: attend<T, 64>(q, k, v, mask, out); break;
    case 128: attend<T, 128>(q, k, v, mask, out); break;
    default: attend<T, 0>(q, k, v, mask, out);
  }
}

}  // namespace

// q [B, KV, G, D] contiguous; k, v [B, KV, L, D] with unit stride in D (views of a larger cache
// are fine); mask [B, L] bool, true where a cached token is attended to. Returns [B, KV, G, D].
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               torch::Tensor mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 2, "bad ranks");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "CPU only");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k and v must share a dtype");
  TORCH_CHECK(mask.scalar_type() == torch::kBool, "mask must be bool");
  TORCH_CHECK(q.size(2) <= kMaxGroup && q.size(3) <= kMaxDim, "group or head size too large");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "k does not match q");
  TORCH_CHECK(v.sizes() == k.sizes(), "v does not match k");
  TORCH_CHECK(mask.size(0) == q.size(0) && mask.size(1) == k.size(2), "mask does not match k");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && mask.stride(1) == 1, "inner dims strided");
  auto qc = q.contiguous();
  auto out = torch::empty_like(qc);
  by_dtype(q.scalar_type(), [&](auto tag) { dispatch<decltype(tag)>(qc, k, v, mask, out); });
  return out;
}

namespace {

// Rounds to the model's dtype where PyTorch's element-wise kernels round, so that the fused
// ops below give what the chain of PyTorch ops gives, bit for bit in bf16.
template <typename T> inline float through(float f) {
  T out;
  store(&out, f);
  return to_float(out);
}
template <> inline float through<float>(float f) { return f; }

// A row normalised by its sum of squares, times the weight. F.rms_norm in fp32, .to(dtype),
// then * weight in dtype: two roundings, as there.
template <typename T>
inline void store_normalised(const T* xr, float squares, const T* wp, int64_t H, double eps,
                             T* o) {
  const float rstd = 1.f / std::sqrt(squares / static_cast<float>(H) + static_cast<float>(eps));
  for (int64_t i = 0; i < H; ++i) store(o + i, through<T>(to_float(xr[i]) * rstd) * to_float(wp[i]));
}

template <typename Scalar>
void rms_norm_rows(const torch::Tensor& x, const torch::Tensor& w, double eps, torch::Tensor& out) {
  using T = Raw<Scalar>;
  const int64_t rows = x.size(0), H = x.size(1);
  const T* xp = raw<Scalar>(x);
  const T* wp = raw<Scalar>(w);
  T* op = raw<Scalar>(out);
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = xp + r * H;
    float squares = 0.f;
    for (int64_t i = 0; i < H; ++i) {
      const float v = to_float(xr[i]);
      squares += v * v;
    }
    store_normalised(xr, squares, wp, H, eps, op + r * H);
  }
}

// x + delta, rounded to the dtype as PyTorch's add rounds, into sum; then sum normalised into
// out, as rms_norm_rows does.
template <typename Scalar>
void add_rms_norm_rows(const torch::Tensor& x, const torch::Tensor& delta, const torch::Tensor& w,
                       double eps, torch::Tensor& sum, torch::Tensor& out) {
  using T = Raw<Scalar>;
  const int64_t rows = x.size(0), H = x.size(1);
  const T* xp = raw<Scalar>(x);
  const T* dp = raw<Scalar>(delta);
  const T* wp = raw<Scalar>(w);
  T* sp = raw<Scalar>(sum);
  T* op = raw<Scalar>(out);
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = xp + r * H;
    const T* dr = dp + r * H;
    T* sr = sp + r * H;
    float squares = 0.f;
    for (int64_t i = 0; i < H; ++i) {
      const float v = through<T>(to_float(xr[i]) + to_float(dr[i]));
      store(sr + i, v);
      squares += v * v;
    }
    store_normalised(sr, squares, wp, H, eps, op + r * H);
  }
}

// silu(gate) * up for rows [gate | up]: F.silu computes in fp32 and rounds, the product rounds.
template <typename Scalar>
void silu_mul_rows(const torch::Tensor& x, torch::Tensor& out) {
  using T = Raw<Scalar>;
  const int64_t rows = x.size(0), I = x.size(1) / 2;
  const T* xp = raw<Scalar>(x);
  T* op = raw<Scalar>(out);
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = xp + r * 2 * I;
    const T* u = g + I;
    T* o = op + r * I;
    for (int64_t i = 0; i < I; ++i) {
      const float gf = to_float(g[i]);
      store(o + i, through<T>(gf / (1.f + std::exp(-gf))) * to_float(u[i]));
    }
  }
}

template <typename Scalar>
void rotate_rows(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                 torch::Tensor& out) {
  using T = Raw<Scalar>;
  const int64_t B = x.size(0), Hh = x.size(1), D = x.size(3), half = D / 2;
  const T* xp = raw<Scalar>(x);
  const T* cp = raw<Scalar>(cos);
  const T* sp = raw<Scalar>(sin);
  T* op = raw<Scalar>(out);
  const int64_t xsb = x.stride(0), xsh = x.stride(1), csb = cos.stride(0), ssb = sin.stride(0);
  for (int64_t b = 0; b < B; ++b) {
    const T* c = cp + b * csb;
    const T* sn = sp + b * ssb;
    for (int64_t h = 0; h < Hh; ++h) {
      const T* xr = xp + b * xsb + h * xsh;
      T* o = op + (b * Hh + h) * D;
      for (int64_t i = 0; i < D; ++i) {
        // x * cos + cat(-x[half:], x[:half]) * sin, each product and the sum rounded.
        const float rotated = i < half ? -to_float(xr[i + half]) : to_float(xr[i - half]);
        const float a = through<T>(to_float(xr[i]) * to_float(c[i]));
        const float s2 = through<T>(rotated * to_float(sn[i]));
        store(o + i, a + s2);
      }
    }
  }
}

}  // namespace

// x [rows, H] contiguous, weight [H]: RMS normalisation as chinwag's RMSNorm computes it, in one
// call instead of six (a 16-row decode step has 61 of them).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x: [rows, H] contiguous");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous() &&
              weight.scalar_type() == x.scalar_type(), "weight: [H] of x's dtype");
  auto out = torch::empty_like(x);
  by_dtype(x.scalar_type(),
           [&](auto tag) { rms_norm_rows<decltype(tag)>(x, weight, eps, out); });
  return out;
}

// x, delta [rows, H] contiguous, weight [H]: the residual stream's next value x + delta and its
// normalisation, in one call instead of two (sum) and six (norm). Returns (sum, normalised).
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor delta, torch::Tensor weight,
                                        double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x: [rows, H] contiguous");
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.is_contiguous() &&
              delta.scalar_type() == x.scalar_type(), "delta: x's shape and dtype, contiguous");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous() &&
              weight.scalar_type() == x.scalar_type(), "weight: [H] of x's dtype");
  auto sum = torch::empty_like(x);
  auto out = torch::empty_like(x);
  by_dtype(x.scalar_type(), [&](auto tag) {
    add_rms_norm_rows<decltype(tag)>(x, delta, weight, eps, sum, out);
  });
  return {sum, out};
}

// x [rows, 2I] contiguous, gate then up (the fused projection's output): silu(gate) * up,
// [rows, I], in one call instead of a split, a silu and a product.
torch::Tensor silu_mul(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() && x.size(1) % 2 == 0,
              "x: [rows, 2I] contiguous");
  auto out = torch::empty({x.size(0), x.size(1) / 2}, x.options());
  by_dtype(x.scalar_type(), [&](auto tag) { silu_mul_rows<decltype(tag)>(x, out); });
  return out;
}

// One decode step's rotary embedding: x [B, heads, 1, D] (a view of the projections: unit
// stride in D), cos and sin [B, 1, 1, D] contiguous. Returns x rotated, contiguous.
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 4 && x.size(2) == 1 && x.stride(3) == 1 && x.device().is_cpu(),
              "x: [B, heads, 1, D] with unit stride in D");
  TORCH_CHECK(x.size(3) % 2 == 0, "an even head size");
  for (const auto& t : {cos, sin}) {
    TORCH_CHECK(t.dim() == 4 && t.size(0) == x.size(0) && t.size(3) == x.size(3) &&
                t.stride(3) == 1 && t.scalar_type() == x.scalar_type(),
                "cos, sin: [B, 1, 1, D] of x's dtype");
  }
  auto out = torch::empty({x.size(0), x.size(1), 1, x.size(3)}, x.options());
  by_dtype(x.scalar_type(), [&](auto tag) { rotate_rows<decltype(tag)>(x, cos, sin, out); });
  return out;
}

void register_linear(pybind11::module& m);  // decode_linear.cpp

// Every kernel lets go of Python's GIL while it computes, as PyTorch's own ops do: a step holds
// it otherwise for each call (the vocabulary projection alone ~3 ms), and the bot's event loop,
// which answers /help and streams replies from another thread, waits that long.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("decode_attention", &decode_attention, "one decode step's attention over the KV cache",
        release());
  m.def("rms_norm", &rms_norm, "RMS normalisation of contiguous rows, times the weight", release());
  m.def("add_rms_norm", &add_rms_norm, "x + delta and its RMS normalisation", release());
  m.def("silu_mul", &silu_mul, "silu(gate) * up of the fused gate/up projection", release());
  m.def("rotary", &rotary, "one decode step's rotary position embedding", release());
  register_linear(m);
}
