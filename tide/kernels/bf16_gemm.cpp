// y = x @ w^T for bf16 weights on CPUs with AVX2+FMA (a vdpbf16ps path where there is AVX512-BF16),
// and bf16 attention whose query rows do not depend on the pass (bf16_attention, at the end).
//
// There, torch's bf16 matmul converts and multiplies one input row at a time: k rows cost k
// single-row steps, so a k-token verify pass costs k target steps and speculation cannot pay.
// This kernel streams the weights from memory once per call, whatever the number of rows:
// - up to 20 rows (single steps, verify passes, tree drafts): weight vectors are widened to fp32
//   in registers and multiplied into 4-8 rows' accumulators at once, with a software prefetch
//   ahead of the stream (1-4 rows cost what one row costs in torch's own bf16 gemv, or less);
// - more rows (prefill): a block of weight rows is widened to fp32 once into a buffer that stays
//   in L1, and every input row is multiplied against it.
// Accumulation is fp32 (as torch's bf16 gemv), in the same order for a row whatever the number of
// rows; bf16 inputs are widened and bf16 outputs rounded to nearest even here, so a layer costs
// one call instead of three ops.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// The buffered path's tiles: 4 x 3 measured fastest of 4x3, 4x2, 2x5 and 6x2 (Zen 1, 2 cores).
constexpr int64_t kRows = 4;   // weight rows per block
constexpr int64_t kCols = 3;   // input rows per tile
constexpr int64_t kChunk = 64;  // input rows per sweep over the weights: they stay in L2

inline __m256 load_bf16(const uint16_t* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// 8 floats to bf16, rounded to nearest even with NaN kept quiet: c10::BFloat16's rounding.
inline void store_bf16(uint16_t* p, __m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), _mm256_castps_si256(nan));
  const __m256i packed = _mm256_packus_epi32(_mm256_srli_epi32(r, 16), _mm256_setzero_si256());
  const __m256i ordered = _mm256_permute4x64_epi64(packed, 0b1000);  // the two lanes' low halves
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(ordered));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The weights stream from memory once; in the few-row path, prefetching kPrefetch elements (4 KB)
// ahead of each row keeps the stream going (2-core Zen 3 EPYC: the model's 210 layer products
// with 1-4 rows take 15-18 ms with it and 20-24 ms without; torch's bf16 gemv takes 18-20 ms for
// one row).
constexpr int64_t kPrefetch = 2048;
// Up to kDirectMaxRows input rows the weights are widened in registers (per tile of 4 rows);
// beyond, widening each block once into fp32 pays (2-core Zen 3: direct is 1.5x faster at 5-8
// rows, level at 13-17, 10-20% slower at 25-64).
constexpr int64_t kDirectMaxRows = 20;

// fp32 weights: a block already widened into L1. bf16 weights: widened here, prefetched ahead.
inline __m256 load_w(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_w(const uint16_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch), _MM_HINT_T0);
  return load_bf16(p);
}

// out[c, r] = dot(x[c, :], w[r, :]) for R weight rows (K contiguous) and C input rows: C * R
// accumulators, R weight vectors and one input vector in the 16 AVX2 registers. Each output is
// summed in the same order whatever the tile, so a row gets the same bits whatever the row count.
template <int R, int C, typename W>
inline void tile(const float* x, int64_t K, const W* w, float* out, int64_t ldo) {
  __m256 acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_w(w + r * K + k);
    for (int c = 0; c < C; ++c) {
      __m256 xv = _mm256_loadu_ps(x + c * K + k);
      for (int r = 0; r < R; ++r) acc[c][r] = _mm256_fmadd_ps(wv[r], xv, acc[c][r]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) out[c * ldo + r] = hsum(acc[c][r]);
}

// a tile of c input rows (0..C) against R weight rows
template <int R, int C, typename W>
inline void tile_n(int64_t c, const float* x, int64_t K, const W* w, float* out, int64_t ldo) {
  if constexpr (C > 0) {
    if (c == C) return tile<R, C>(x, K, w, out, ldo);
    return tile_n<R, C - 1>(c, x, K, w, out, ldo);
  }
}

// R weight rows against all M input rows, C at a time, then the rest: the first tile pulls the
// weight rows into L1, the others find them there.
template <int R, int C, typename W>
inline void rows_block(const float* x, int64_t M, int64_t K, const W* w, float* out, int64_t N) {
  int64_t m = 0;
  for (; m + C <= M; m += C) tile<R, C>(x + m * K, K, w, out + m * N, N);
  tile_n<R, C - 1>(M - m, x + m * K, K, w, out + m * N, N);
}

constexpr int64_t kDirectRows = 12;  // weight rows per parallel block: whole tiles
constexpr int kR = 2;  // weight rows per tile: measured best for 1-4 input rows (of 1, 2, 3/4, 6/4/3/2)

// R weight rows against all M input rows in ceil(M / C) tiles as even as can be (4 + 4, not
// 6 + 2: a tile of few rows has too few accumulators to hide the FMA latency)
template <int R, int C, typename W>
inline void rows_even(const float* x, int64_t M, int64_t K, const W* w, float* out, int64_t N) {
  const int64_t tiles = (M + C - 1) / C;
  int64_t m = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t c = (M - m) / (tiles - t);  // the later tiles take the extra rows
    tile_n<R, C>(c, x + m * K, K, w, out + m * N, N);
    m += c;
  }
}

// Past 4 rows, fewer widenings per product pay: 5-8 rows in one tile against one weight row
// (each weight widened once), more in tiles of up to 6 against 2 (12 accumulators). 2-core Zen 3,
// the model's 211 products, interleaved, median of 15: 11-14% faster at 5-17 rows than tiles of 4.
void direct(const float* x, int64_t M, int64_t K, const uint16_t* w, float* out, int64_t N) {
  const int64_t blocks = (N + kDirectRows - 1) / kDirectRows;
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    const int64_t n1 = std::min(N, b1 * kDirectRows);
    int64_t n = b0 * kDirectRows;
    if (M <= 4) {
      for (; n + kR <= n1; n += kR) rows_block<kR, 4>(x, M, K, w + n * K, out + n, N);
      for (; n < n1; ++n) rows_block<1, 4>(x, M, K, w + n * K, out + n, N);
    } else if (M <= 8) {
      for (; n < n1; ++n) tile_n<1, 8>(M, x, K, w + n * K, out + n, N);
    } else {
      for (; n + kR <= n1; n += kR) rows_even<kR, 6>(x, M, K, w + n * K, out + n, N);
      for (; n < n1; ++n) rows_even<1, 6>(x, M, K, w + n * K, out + n, N);
    }
  });
}

void buffered(const float* xp, int64_t M, int64_t K, const uint16_t* wp, float* op, int64_t N) {
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
          rows_block<kRows, kCols>(xc, rows_in, K, wf.data(), oc + n, N);
        } else {
          for (int64_t r = 0; r < rows; ++r) rows_block<1, kCols>(xc, rows_in, K, wf.data() + r * K, oc + n + r, N);
        }
      }
    });
  }
}


// ---- AVX512-BF16 (AMD Zen 4/5, Intel Cooper Lake and later): bf16 inputs, vdpbf16ps ----
// There each instruction multiplies 32 bf16 pairs and sums them into 16 fp32 lanes, with no
// widening of the weights: 4x the products per instruction of the AVX2 path above, so passes of
// 8-32 rows stay close to the cost of streaming the weights once. As above, every output is summed
// in one fixed order (K in steps of 32 into one 16-lane accumulator, then the same reduction tree
// for its place in a block of 4 weight rows), whatever the number of input rows: a row gets the
// same bits in a single step, a verify pass of any width, a tree or a prefill. The sums differ
// from the AVX2 path's (pairs are added before they reach the accumulator; denormals flush), so
// a process must use one path for all its products: SkinnyLinear takes this one for bf16 inputs on
// every CPU that has it (tide.kernels.dp_path). 2-core Zen 5 EPYC, the model's 211 products: 1 row
// 6.7 ms, 17 rows 8.0, 32 rows 12.0 (torch's bf16 path: 12.9, 16.7, 22.0).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

constexpr int kDpR = 4;        // weight rows per tile
constexpr int kDpC = 6;        // input rows per tile: 24 accumulators + 4 weight vectors + 1 input
constexpr int64_t kDpBlock = 32;  // weight rows per parallel task
constexpr int64_t kDpChunk = 64;  // input rows per sweep over the weights: they stay in L2
constexpr int64_t kDpAheadMax = 3 * kPrefetch;  // the farthest a later tile prefetches (12 KB)

inline __m512bh dp_load(const uint16_t* p, int64_t left) {
  if (left >= 32) return (__m512bh)_mm512_loadu_si512(p);
  return (__m512bh)_mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << left) - 1), p);
}

// four accumulators' sums as [a, b, c, d]: one tree, the same for each of the four
inline __m128 dp_sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a02 b02 a13 b13 per lane
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));  // a b c d per lane
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// out[c, r] = dot(x[c, :], w[r, :]) for R weight rows and C input rows (all bf16, K contiguous).
template <int R, int C>
inline void dp_tile(const uint16_t* x, int64_t K, const uint16_t* w, float* out, int64_t ldo, int64_t ahead) {
  // the loops over r and c unrolled early so the accumulators live in registers (without the
  // pragmas GCC kept a copy of them on the stack and stored all of them every step)
  __m512 acc[C][R];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
  auto step = [&](int64_t k, int64_t left) __attribute__((always_inline)) {
    __m512bh wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if (ahead) _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k + ahead), _MM_HINT_T0);
      wv[r] = dp_load(w + r * K + k, left);
    }
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const __m512bh xv = dp_load(x + c * K + k, left);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[c][r] = _mm512_dpbf16_ps(acc[c][r], xv, wv[r]);
    }
  };
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) step(k, 32);
  if (k < K) step(k, K - k);  // the masked tail: the same order as a full step
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) {
    if constexpr (R == 4) {
      _mm_storeu_ps(out + c * ldo, dp_sum4(acc[c][0], acc[c][1], acc[c][2], acc[c][3]));
    } else {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) out[c * ldo + r] = _mm512_reduce_add_ps(acc[c][r]);
    }
  }
}

// a tile of c input rows (0..C)
template <int R, int C>
inline void dp_tile_n(int64_t c, const uint16_t* x, int64_t K, const uint16_t* w, float* out, int64_t ldo,
                      int64_t ahead) {
  if constexpr (C > 0) {
    if (c == C) return dp_tile<R, C>(x, K, w, out, ldo, ahead);
    return dp_tile_n<R, C - 1>(c, x, K, w, out, ldo, ahead);
  }
}

template <int R>
inline void dp_rows(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, float* out, int64_t N) {
  // the first tile streams the weights from memory, the rest find them in L1; every tile
  // prefetches further ahead than the one before, so memory keeps streaming while they compute
  int64_t m = 0, ahead = kPrefetch;
  for (; m + kDpC <= M; m += kDpC, ahead = std::min(ahead + kPrefetch, kDpAheadMax))
    dp_tile<R, kDpC>(x + m * K, K, w, out + m * N, N, ahead);
  dp_tile_n<R, kDpC - 1>(M - m, x + m * K, K, w, out + m * N, N, ahead);
}

void dp_linear(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, float* out, int64_t N) {
  const int64_t blocks = (N + kDpBlock - 1) / kDpBlock;
  for (int64_t m0 = 0; m0 < M; m0 += kDpChunk) {
    const int64_t rows_in = std::min(kDpChunk, M - m0);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      const int64_t n1 = std::min(N, b1 * kDpBlock);
      int64_t n = b0 * kDpBlock;
      for (; n + kDpR <= n1; n += kDpR) dp_rows<kDpR>(x + m0 * K, rows_in, K, w + n * K, out + m0 * N + n, N);
      for (; n < n1; ++n) dp_rows<1>(x + m0 * K, rows_in, K, w + n * K, out + m0 * N + n, N);
    });
  }
}

bool dp_bf16_cpu() { return __builtin_cpu_supports("avx512bf16"); }

#pragma GCC pop_options

}  // namespace

// x: (M, K) float32 or bfloat16, contiguous; w: (N, K) bfloat16 contiguous; K % 8 == 0.
// Returns x @ w^T as (M, N) in x's dtype (fp32 sums; bf16 outputs rounded to nearest even).
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, bool dp) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "bf16_linear: x and w must be 2-D");
  TORCH_CHECK((x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16) &&
                  w.scalar_type() == torch::kBFloat16,
              "bf16_linear: x must be float32 or bfloat16 and w bfloat16");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "bf16_linear: inputs must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && K % 8 == 0, "bf16_linear: shapes (", M, ", ", K, ") x (", N, ", ",
              w.size(1), ")^T need equal K, a multiple of 8");
  const bool bf16_io = x.scalar_type() == torch::kBFloat16;
  static const bool dp_cpu = dp_bf16_cpu();
  TORCH_CHECK(!dp || (bf16_io && dp_cpu), "bf16_linear_dp: needs bf16 inputs and a CPU with AVX512-BF16");
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  std::vector<float> xbuf;  // bf16 inputs widened once: M x K is small next to the weights
  const float* xp = nullptr;
  if (dp) {
    // the AVX512-BF16 path reads bf16 inputs as they are
  } else if (bf16_io) {
    xbuf.resize(M * K);
    const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    for (int64_t i = 0; i < M * K; i += 8) _mm256_storeu_ps(xbuf.data() + i, load_bf16(xs + i));
    xp = xbuf.data();
  } else {
    xp = x.data_ptr<float>();
  }
  auto out = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  float* op = out.data_ptr<float>();
  if (dp) {
    dp_linear(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, K, wp, op, N);
  } else if (M <= kDirectMaxRows) {
    direct(xp, M, K, wp, op, N);
  } else {
    buffered(xp, M, K, wp, op, N);
  }
  if (!bf16_io) return out;
  auto y = torch::empty({M, N}, x.options());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  uint16_t* yb = reinterpret_cast<uint16_t*>(yp);
  at::parallel_for(0, (M * N) / 8, 1 << 12, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0 * 8; i < i1 * 8; i += 8) store_bf16(yb + i, _mm256_loadu_ps(op + i));
  });
  for (int64_t i = (M * N) / 8 * 8; i < M * N; ++i) yp[i] = at::BFloat16(op[i]);  // c10: the same rounding
  return y;
}

namespace {

// e^x for 8 floats (Cephes' polynomial, as in avx_mathfun; ~1 ulp over the softmax's range
// x <= 0). Every element goes through this same code, whatever its lane.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(0x7f)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

constexpr int64_t kMaxHeadDim = 256;

// G query rows (heads of one group, so one set of visible keys) of one position: softmax(q . k_j
// * scale + bias_j) over the visible keys j, times V. Each row's result depends only on the
// visible keys' (k_j, v_j, bias_j) in cache order: every score is one fixed-order dot product
// (one FMA chain over the head dim, then the same horizontal sum), the exponentials are
// elementwise, and the softmax sum and the weighted sum of values run over the visible keys one
// after another. So a token's row gets the same bits in a single-token step, in a verify pass of
// any width, or as a tree node that sees the same keys, whatever G and however the keys are
// grouped below; this is what makes bf16 speculation token-identical to the bf16 target alone.
// The G rows share each key's and value's bf16 -> fp32 widening.
template <int G, int NK>
inline void scores(const float* q, const uint16_t* k, int64_t D, float scale, const int32_t* idx, int64_t j,
                   float* s, int64_t ls) {
  const uint16_t* kr[NK];
  __m256 a[NK][G];
  for (int t = 0; t < NK; ++t) {
    kr[t] = k + static_cast<int64_t>(idx[j + t]) * D;
    for (int g = 0; g < G; ++g) a[t][g] = _mm256_setzero_ps();
  }
  for (int64_t c = 0; c < D; c += 8) {
    __m256 kv[NK];
    for (int t = 0; t < NK; ++t) kv[t] = load_bf16(kr[t] + c);
    for (int g = 0; g < G; ++g) {
      const __m256 qv = _mm256_loadu_ps(q + g * D + c);
      for (int t = 0; t < NK; ++t) a[t][g] = _mm256_fmadd_ps(qv, kv[t], a[t][g]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int t = 0; t < NK; ++t) s[g * ls + j + t] = hsum(a[t][g]) * scale;
}

// out[g][c0 * 8 ..] += sum over visible j of p_g[j] * v_j, for CV vectors of the head dim.
template <int G, int CV>
inline void weighted_values(const float* s, int64_t ls, const uint16_t* v, int64_t D, const int32_t* idx,
                            int64_t cnt, int64_t c0, const float* denom, uint16_t* out, int64_t lo) {
  __m256 acc[G][CV];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < CV; ++c) acc[g][c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < cnt; ++j) {
    const uint16_t* vj = v + static_cast<int64_t>(idx[j]) * D + c0 * 8;
    __m256 p[G];
    for (int g = 0; g < G; ++g) p[g] = _mm256_set1_ps(s[g * ls + j]);
    for (int c = 0; c < CV; ++c) {
      const __m256 vv = load_bf16(vj + c * 8);
      for (int g = 0; g < G; ++g) acc[g][c] = _mm256_fmadd_ps(p[g], vv, acc[g][c]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m256 vd = _mm256_set1_ps(denom[g]);
    for (int c = 0; c < CV; ++c) store_bf16(out + g * lo + (c0 + c) * 8, _mm256_div_ps(acc[g][c], vd));
  }
}

template <int G>
void attend_rows(const float* q, const uint16_t* k, const uint16_t* v, int64_t T, int64_t D, float scale,
                 const bool* allowed, const float* bias, int64_t visible_to, float* s, int64_t ls, int32_t* idx,
                 uint16_t* out, int64_t lo) {
  int64_t cnt = 0;
  for (int64_t j = 0; j < T; ++j) {
    if (allowed ? allowed[j] : (bias ? bias[j] > -1e30f : j <= visible_to)) idx[cnt++] = static_cast<int32_t>(j);
  }
  if (cnt == 0) {  // a fully masked row (padding): zeros, as a defined value
    for (int g = 0; g < G; ++g)
      for (int64_t c = 0; c < D; ++c) out[g * lo + c] = 0;
    return;
  }
  constexpr int NK = G <= 2 ? 4 : 2;  // keys per step: independent FMA chains within 16 registers
  int64_t j = 0;
  for (; j + NK <= cnt; j += NK) scores<G, NK>(q, k, D, scale, idx, j, s, ls);
  for (; j < cnt; ++j) scores<G, 1>(q, k, D, scale, idx, j, s, ls);
  float denom[G];
  for (int g = 0; g < G; ++g) {
    float* sg = s + g * ls;
    float mx = -INFINITY;
    for (j = 0; j < cnt; ++j) {
      if (bias) sg[j] += bias[idx[j]];
      mx = std::max(mx, sg[j]);
    }
    const __m256 vmx = _mm256_set1_ps(mx);
    for (j = 0; j < cnt; j += 8) _mm256_storeu_ps(sg + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + j), vmx)));
    denom[g] = 0.f;
    for (j = 0; j < cnt; ++j) denom[g] += sg[j];
  }
  constexpr int CV = G == 1 ? 8 : (G <= 3 ? 4 : 2);  // value vectors per sweep over the keys
  const int64_t nv = D / 8;
  int64_t c0 = 0;
  for (; c0 + CV <= nv; c0 += CV) weighted_values<G, CV>(s, ls, v, D, idx, cnt, c0, denom, out, lo);
  for (; c0 < nv; ++c0) weighted_values<G, 1>(s, ls, v, D, idx, cnt, c0, denom, out, lo);
}

}  // namespace

// Keys and values may be views into a larger cache (a slot's capacity past T): each position's D
// values contiguous, any stride between heads and between batch rows.
// rows of D contiguous; a length-1 position axis has any stride (a contiguous (B, T, H, D) -> (B, H, T, D)
// transpose of one position keeps its view's stride there, and is_contiguous() ignores it)
static bool rows_of_d(const torch::Tensor& t) {
  return t.stride(3) == 1 && (t.size(2) <= 1 || t.stride(2) == t.size(3));
}

// q: (B, H, n, D) bf16; k, v: (Bk, Hkv, >= T, D) bf16 (H a multiple of Hkv: grouped queries);
// mask: empty (causal: row i sees keys 0..T-n+i), or (B, n, T) bool (true = attend) or float32
// (additive; < -1e30 = masked). rows: empty (query batch b reads k[b], Bk == B, T = k's length),
// or (n,) int32 with B == 1: packed queries, query i reads k[rows[i]] under mask row i (T: the
// mask's). Returns (B, n, H, D) bf16, the layout attention modules expect.
static torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& mask, double scale, const torch::Tensor& rows) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "bf16_attention: q, k, v must be 4-D");
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 && k.scalar_type() == torch::kBFloat16 &&
                  v.scalar_type() == torch::kBFloat16, "bf16_attention: q, k, v must be bfloat16");
  TORCH_CHECK(q.is_contiguous() && rows_of_d(k) && rows_of_d(v),
              "bf16_attention: q must be contiguous, k and v rows of head_dim contiguous");
  const bool packed = rows.defined() && rows.numel() > 0;
  const bool has_mask = mask.numel() > 0;
  const int64_t B = q.size(0), H = q.size(1), n = q.size(2), D = q.size(3), Hkv = k.size(1), Bk = k.size(0);
  const int64_t T = packed ? (has_mask ? mask.size(2) : 0) : k.size(2);
  TORCH_CHECK(v.size(0) == Bk && v.size(1) == Hkv && v.size(2) == k.size(2) && k.size(3) == D && v.size(3) == D &&
                  Hkv > 0 && H % Hkv == 0, "bf16_attention: q, k, v shapes do not match");
  TORCH_CHECK(D % 8 == 0 && D <= kMaxHeadDim, "bf16_attention: head dim must be a multiple of 8, at most 256");
  const int32_t* rp = nullptr;
  if (packed) {
    TORCH_CHECK(B == 1 && has_mask && rows.scalar_type() == torch::kInt && rows.is_contiguous() && rows.numel() == n,
                "bf16_attention: packed queries need B == 1, a mask and (n,) int32 rows");
    TORCH_CHECK(T <= k.size(2), "bf16_attention: the mask is longer than the cache");
    rp = rows.data_ptr<int32_t>();
    for (int64_t i = 0; i < n; ++i) TORCH_CHECK(rp[i] >= 0 && rp[i] < Bk, "bf16_attention: a row is out of range");
  } else {
    TORCH_CHECK(Bk == B, "bf16_attention: q, k, v batch sizes do not match");
    TORCH_CHECK(n <= T, "bf16_attention: more queries than keys");
  }
  if (has_mask) {
    TORCH_CHECK(mask.dim() == 3 && mask.size(0) == B && mask.size(1) == n && mask.size(2) == T &&
                    mask.is_contiguous() && (mask.scalar_type() == torch::kBool || mask.scalar_type() == torch::kFloat),
                "bf16_attention: mask must be (B, n, T) bool or float32, contiguous");
  }
  const bool* mb = has_mask && mask.scalar_type() == torch::kBool ? mask.data_ptr<bool>() : nullptr;
  const float* mf = has_mask && mask.scalar_type() == torch::kFloat ? mask.data_ptr<float>() : nullptr;
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), vs0 = v.stride(0), vs1 = v.stride(1);
  auto out = torch::empty({B, n, H, D}, q.options());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t group = H / Hkv;
  const float sc = static_cast<float>(scale);
  // a task: up to 4 heads of one group at one position (they share the visible keys and the
  // widening of each key and value: 1.6-1.75x faster than a head at a time for SmolLM2's groups of
  // 3, one thread of a Zen 1 EPYC); single heads where that leaves a thread idle
  int64_t per = std::min<int64_t>(group, 4);
  if (B * Hkv * n * ((group + per - 1) / per) < at::get_num_threads()) per = 1;
  const int64_t chunks = (group + per - 1) / per;
  at::parallel_for(0, B * Hkv * chunks * n, 1, [&](int64_t t0, int64_t t1) {
    const int64_t ls = T + 8;
    std::vector<float> s(4 * ls), qf(4 * D);
    std::vector<int32_t> idx(T);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t % n, ch = (t / n) % chunks, hk = (t / (n * chunks)) % Hkv, b = t / (n * chunks * Hkv);
      const int64_t h0 = hk * group + ch * per, G = std::min(per, group - ch * per);
      for (int64_t g = 0; g < G; ++g) {
        const uint16_t* qr = qp + ((b * H + h0 + g) * n + i) * D;
        for (int64_t c = 0; c < D; c += 8) _mm256_storeu_ps(qf.data() + g * D + c, load_bf16(qr + c));
      }
      const int64_t kb = rp ? rp[i] : b;
      const uint16_t* kr = kp + kb * ks0 + hk * ks1;
      const uint16_t* vr = vp + kb * vs0 + hk * vs1;
      const int64_t row = (b * n + i) * T;
      const bool* al = mb ? mb + row : nullptr;
      const float* bi = mf ? mf + row : nullptr;
      uint16_t* o = op + ((b * n + i) * H + h0) * D;
      switch (G) {
        case 4: attend_rows<4>(qf.data(), kr, vr, T, D, sc, al, bi, T - n + i, s.data(), ls, idx.data(), o, D); break;
        case 3: attend_rows<3>(qf.data(), kr, vr, T, D, sc, al, bi, T - n + i, s.data(), ls, idx.data(), o, D); break;
        case 2: attend_rows<2>(qf.data(), kr, vr, T, D, sc, al, bi, T - n + i, s.data(), ls, idx.data(), o, D); break;
        default: attend_rows<1>(qf.data(), kr, vr, T, D, sc, al, bi, T - n + i, s.data(), ls, idx.data(), o, D); break;
      }
    }
  });
  return out;
}

torch::Tensor bf16_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const torch::Tensor& mask, double scale) {
  return attention(q, k, v, mask, scale, torch::Tensor());
}

torch::Tensor bf16_attention_rows(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                  const torch::Tensor& mask, double scale, const torch::Tensor& rows) {
  return attention(q, k, v, mask, scale, rows);
}

torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& w) { return linear(x, w, false); }

// bf16 x @ w^T with vdpbf16ps; only on CPUs with AVX512-BF16 (dp_bf16())
torch::Tensor bf16_linear_dp(const torch::Tensor& x, const torch::Tensor& w) { return linear(x, w, true); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_linear", &bf16_linear, "x (M, K) fp32 or bf16 @ w (N, K) bf16 ^T -> (M, N) in x's dtype");
  m.def("bf16_linear_dp", &bf16_linear_dp, "bf16 x (M, K) @ w (N, K) ^T with vdpbf16ps (AVX512-BF16 CPUs)");
  m.def("dp_bf16", &dp_bf16_cpu, "whether this CPU has AVX512-BF16 (bf16_linear_dp runs)");
  m.def("bf16_attention", &bf16_attention, "softmax(q k^T * scale + mask) v, bf16, rows independent of n");
  m.def("bf16_attention_rows", &bf16_attention_rows,
        "bf16_attention over packed queries: query i reads the cache row rows[i] (B == 1, a mask)");
}
