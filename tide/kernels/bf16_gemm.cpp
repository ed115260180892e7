// y = x @ w^T for bf16 weights on CPUs with AVX2+FMA but no bf16 units (no AVX512-BF16/AMX).
//
// There, torch's bf16 matmul converts and multiplies one input row at a time: k rows cost k
// single-row steps, so a k-token verify pass costs k target steps and speculation cannot pay.
// This kernel converts a block of weight rows to fp32 once into a buffer that stays in L1, then
// multiplies every input row against it with fp32 FMAs (fp32 accumulation, as torch's bf16 gemv
// does): the weights stream from memory once per pass, whatever the number of rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <vector>

namespace {

// A tile keeps kRows x kCols accumulators, kRows weight vectors and one input vector in the 16
// AVX2 registers; 4 x 3 measured fastest of 4x3, 4x2, 2x5 and 6x2 (Zen 1, 2 cores).
constexpr int64_t kRows = 4;   // weight rows per block
constexpr int64_t kCols = 3;   // input rows per tile
constexpr int64_t kChunk = 64;  // input rows per sweep over the weights: they stay in L2

inline __m256 load_bf16(const uint16_t* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// out[c, r] = dot(x[c, :], wf[r, :]) for R weight rows (fp32, K contiguous) and C input rows.
template <int R, int C>
inline void tile(const float* x, int64_t K, const float* wf, float* out, int64_t ldo) {
  __m256 acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_ps(wf + r * K + k);
    for (int c = 0; c < C; ++c) {
      __m256 xv = _mm256_loadu_ps(x + c * K + k);
      for (int r = 0; r < R; ++r) acc[c][r] = _mm256_fmadd_ps(wv[r], xv, acc[c][r]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) out[c * ldo + r] = hsum(acc[c][r]);
}

template <int R>
inline void rows_block(const float* x, int64_t M, int64_t K, const float* wf, float* out, int64_t N) {
  int64_t m = 0;
  for (; m + kCols <= M; m += kCols) tile<R, kCols>(x + m * K, K, wf, out + m * N, N);
  for (; m + 2 <= M; m += 2) tile<R, 2>(x + m * K, K, wf, out + m * N, N);
  for (; m < M; ++m) tile<R, 1>(x + m * K, K, wf, out + m * N, N);
}

}  // namespace

// x: (M, K) float32 contiguous; w: (N, K) bfloat16 contiguous; K % 8 == 0. Returns (M, N) float32.
torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "bf16_linear: x and w must be 2-D");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kBFloat16,
              "bf16_linear: x must be float32 and w bfloat16");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "bf16_linear: inputs must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && K % 8 == 0, "bf16_linear: shapes (", M, ", ", K, ") x (", N, ", ",
              w.size(1), ")^T need equal K, a multiple of 8");
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  const int64_t blocks = (N + kRows - 1) / kRows;
  for (int64_t m0 = 0; m0 < M; m0 += kChunk) {
    const int64_t rows_in = std::min(kChunk, M - m0);
    const float* xc = xp + m0 * K;
    float* oc = op + m0 * N;
    at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
      std::vector<float> wf(kRows * K);  // this block's weights as fp32: stays in L1
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = b * kRows, rows = std::min(kRows, N - n);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t k = 0; k < K; k += 8)
            _mm256_storeu_ps(wf.data() + r * K + k, load_bf16(wp + (n + r) * K + k));
        if (rows == kRows) {
          rows_block<kRows>(xc, rows_in, K, wf.data(), oc + n, N);
        } else {
          for (int64_t r = 0; r < rows; ++r) rows_block<1>(xc, rows_in, K, wf.data() + r * K, oc + n + r, N);
        }
      }
    });
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_linear", &bf16_linear, "x (M, K) fp32 @ w (N, K) bf16 ^T -> (M, N) fp32");
}
