// CPU kernels where torch's own ops cost most of a decode step's time outside the GEMMs.
//
// Paged decode attention: one query token per request, read straight off the
// block-major KV cache (num_blocks, Hkv, block_size, D) through each request's block table.
// Torch's path gathers every request's blocks into a contiguous buffer first and reads them
// again in two matmuls; this reads each K and V row once, with the query heads that share
// a KV head (GQA) computed together. With AVX-512 and head sizes of 64 or 128, work items
// are requests (all their KV heads, so that each block is read in one contiguous sweep);
// otherwise (request, KV head). Both spread over torch's own thread pool.
//
// RMSNorm, alone or after the residual add: torch's runs as five kernels (pow, mean, add,
// rsqrt, mul) of ~10 us each on a decode batch's rows.
//
// A structured output's token bitmask applied to the logits: with AVX-512 each 16 bits are
// a store mask, so a 49k-token row takes ~3k masked stores; torch's path unpacks the bits
// into a bool tensor first (8 ms for 32 rows here, against a 100-200 ms decode step).
//
// Multi-LoRA's shrink and expand for a batch that mixes adapters (punica's BGMV/SGMV on the
// CPU): rows are grouped by adapter slot inside the kernel, and each tile of up to four rows
// of one slot reads that slot's A and B once. Torch's path multiplies every row by every
// slot's A (and masks), four times the work at four adapters, in many small products.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// Tiles are requested this many tiles ahead of use. A request's tiles are scattered over
// the cache, mostly in DRAM, and each (block, head) tile is a page of its own: without
// this every tile starts with a full memory latency (4.6 -> 2.2 ms at batch 32, context
// 192, SmolLM2's heads, a 480 MiB cache).
constexpr int64_t kAhead = 2;

template <typename T>
inline void prefetch_row(const T* row, int64_t head_dim) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t i = 0; i < head_dim * static_cast<int64_t>(sizeof(T)); i += 64)
    __builtin_prefetch(p + i);
}

// q (already in fp32) . k over n elements.
template <typename T>
inline float dot(const float* q, const T* k, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += q[d] * static_cast<float>(k[d]);
  return s;
}

// acc += p * v over n elements.
template <typename T>
inline void axpy(float* acc, float p, const T* v, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) acc[d] += p * static_cast<float>(v[d]);
}

// s[i] = exp(s[i] - m) for i < n; returns their sum.
inline float exp_sum(float* s, int64_t n, float m) {
  float sum = 0.f;
  int64_t i = 0;
#ifdef __AVX512F__
  // Cephes' expf (as Sleef and torch's vectorized exp): 2^k * p(r), |error| <= 2 ulp.
  const __m512 vm = _mm512_set1_ps(m), vsum0 = _mm512_setzero_ps();
  __m512 vsum = vsum0;
  for (; i + 16 <= n; i += 16) {
    __m512 x = _mm512_sub_ps(_mm512_loadu_ps(s + i), vm);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3365447f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
    y = _mm512_scalef_ps(y, k);
    _mm512_storeu_ps(s + i, y);
    vsum = _mm512_add_ps(vsum, y);
  }
  sum = _mm512_reduce_add_ps(vsum);
#endif
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - m);
    sum += s[i];
  }
  return sum;
}

// One (request, KV head): its `group` query heads over its first ctx_len keys. HEAD_DIM > 0
// fixes the head size at compile time (the row loops unroll into whole vector registers);
// 0 reads it from `dim`.
template <typename T, typename C, int64_t HEAD_DIM>
void decode_item(const T* q, const C* k_cache, const C* v_cache, const int64_t* table,
                 int64_t ctx_len, int64_t group, int64_t dim, int64_t block_size,
                 int64_t block_stride, int64_t head_offset, float scale, float out_scale,
                 float* qf, float* scores, float* acc, T* out) {
  const int64_t head_dim = HEAD_DIM > 0 ? HEAD_DIM : dim;
  const int64_t num_blocks = (ctx_len + block_size - 1) / block_size;
  auto tile = [&](const C* cache, int64_t j) {
    return cache + table[j] * block_stride + head_offset;
  };
  // The first kAhead tiles, requested before the pass that reads them.
  auto prefetch_first = [&](const C* cache) {
    for (int64_t j = 0; j < std::min(kAhead, num_blocks); ++j)
      for (int64_t t = 0; t < block_size; ++t) prefetch_row(tile(cache, j) + t * head_dim, head_dim);
  };
  // fn(row, pos) for each of the request's keys (or values) in order, requesting the tile
  // kAhead blocks on, a row of it per row read.
  auto for_each_row = [&](const C* cache, auto&& fn) {
    for (int64_t j = 0; j < num_blocks; ++j) {
      const C* rows_of = tile(cache, j);
      const C* ahead = j + kAhead < num_blocks ? tile(cache, j + kAhead) : nullptr;
      const int64_t rows = std::min(block_size, ctx_len - j * block_size);
      for (int64_t t = 0; t < rows; ++t) {
        if (ahead) prefetch_row(ahead + t * head_dim, head_dim);
        fn(rows_of + t * head_dim, j * block_size + t);
      }
    }
  };

  prefetch_first(k_cache);
  for (int64_t i = 0; i < group * head_dim; ++i) qf[i] = static_cast<float>(q[i]) * scale;
  for_each_row(k_cache, [&](const C* k, int64_t pos) {
    for (int64_t g = 0; g < group; ++g) scores[g * ctx_len + pos] = dot(qf + g * head_dim, k, head_dim);
  });

  prefetch_first(v_cache);  // while the softmax runs
  float inv_sum[64];  // group <= 64 (checked by the caller)
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * ctx_len;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < ctx_len; ++i) m = std::max(m, s[i]);
    inv_sum[g] = 1.f / exp_sum(s, ctx_len, m);
  }

  std::fill(acc, acc + group * head_dim, 0.f);
  for_each_row(v_cache, [&](const C* v, int64_t pos) {
    for (int64_t g = 0; g < group; ++g)
      axpy(acc + g * head_dim, scores[g * ctx_len + pos], v, head_dim);
  });
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < head_dim; ++d)
      out[g * head_dim + d] = static_cast<T>(acc[g * head_dim + d] * inv_sum[g] * out_scale);
}

#ifdef __AVX512F__
// The same with AVX-512, for head sizes of 16 * NV. Scores are made 16 keys at a time: each
// key's products with a query head are summed down to one vector of 16 partial sums, and
// the 16 vectors are then added across in one transposing tree (45 instructions for 16
// keys, against ~8 each for a horizontal sum per key). The heads of a group are taken GN
// at a time, their query rows and output rows held in registers; K and V rows are widened
// to fp32 once per key for all GN heads.
template <typename T>
inline __m512 load16(const T* p);
template <>
inline __m512 load16<float>(const float* p) {
  return _mm512_loadu_ps(p);
}
template <>
inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
template <>
inline __m512 load16<c10::Half>(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// A row of 16 * NV values widened into NV vectors, `factor` times smaller than stored (the
// kernel folds `factor` into its scales).
template <typename C>
struct Rows {
  static constexpr float factor = 1.f;
  template <int NV>
  static inline void load(const C* p, __m512* out) {
    for (int v = 0; v < NV; ++v) out[v] = load16(p + 16 * v);
  }
};

// FP8 KV (this CPU has no conversion from fp8, nor avx512_fp16), 32 values at a time through
// fp16: e5m2 is the top byte of an fp16; e4m3's sign and 7 magnitude bits, placed at the
// top of an fp16 (x << 7, the sign carried from bit 14 to bit 15 by adding it to itself),
// make an fp16 2^-8 times the value, subnormals included, with no special case.
template <typename Fp8, bool E4M3>
struct Fp8Rows {
  static constexpr float factor = E4M3 ? 256.f : 1.f;
  template <int NV>
  static inline void load(const Fp8* p, __m512* out) {
    static_assert(NV % 2 == 0, "rows of 32 values");
    for (int v = 0; v < NV; v += 2) {
      __m512i h = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * v)));
      if constexpr (E4M3) {
        const __m512i y = _mm512_slli_epi16(h, 7);
        h = _mm512_add_epi16(y, _mm512_and_si512(y, _mm512_set1_epi16(0x4000)));
      } else {
        h = _mm512_slli_epi16(h, 8);
      }
      out[v] = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
      out[v + 1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
    }
  }
};
template <>
struct Rows<c10::Float8_e4m3fn> : Fp8Rows<c10::Float8_e4m3fn, true> {};
template <>
struct Rows<c10::Float8_e5m2> : Fp8Rows<c10::Float8_e5m2, false> {};

// out[i] = the sum of v[i]'s 16 lanes, for i < 16.
inline __m512 sum_across16(__m512* v) {
  __m512 s[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// A request's rows in the block-major cache: row `pos` of KV head `h`.
template <typename T>
struct PagedRows {
  const T* cache;
  const int64_t* table;
  int64_t block_shift, block_mask, block_stride, head_stride, row_size;
  const T* operator()(int64_t pos, int64_t h) const {
    return cache + table[pos >> block_shift] * block_stride + h * head_stride +
           (pos & block_mask) * row_size;
  }
};

// Scores of query heads [g0, g0 + GN) of KV head h over keys [pos0, pos0 + n), n <= 16:
// scores[g * ctx_len + pos].
template <typename T, int NV, int GN>
void scores_avx512(const float* qf, const PagedRows<T>& keys, int64_t h, int64_t group,
                   int64_t g0, int64_t pos0, int n, int64_t ctx_len, float* scores) {
  constexpr int64_t D = 16 * NV;
  __m512 q[GN][NV];
  for (int g = 0; g < GN; ++g)
    for (int v = 0; v < NV; ++v) q[g][v] = _mm512_loadu_ps(qf + (h * group + g0 + g) * D + 16 * v);
  __m512 part[GN][16];
  for (int t = 0; t < n; ++t) {
    const T* row = keys(pos0 + t, h);
    __m512 k[NV];
    Rows<T>::template load<NV>(row, k);
    for (int g = 0; g < GN; ++g) {
      __m512 acc = _mm512_mul_ps(q[g][0], k[0]);
      for (int v = 1; v < NV; ++v) acc = _mm512_fmadd_ps(q[g][v], k[v], acc);
      part[g][t] = acc;
    }
  }
  for (int t = n; t < 16; ++t)
    for (int g = 0; g < GN; ++g) part[g][t] = _mm512_setzero_ps();
  const __mmask16 keep = static_cast<__mmask16>((1u << n) - 1);
  for (int g = 0; g < GN; ++g)
    _mm512_mask_storeu_ps(scores + (h * group + g0 + g) * ctx_len + pos0, keep,
                          sum_across16(part[g]));
}

// outf[g] += sum over keys [pos0, pos0 + n) of p[g][pos] * v[pos], for query heads
// [g0, g0 + GN) of KV head h.
template <typename T, int NV, int GN>
void weighted_sum_avx512(const float* scores, const PagedRows<T>& values, int64_t h,
                         int64_t group, int64_t g0, int64_t pos0, int n, int64_t ctx_len,
                         float* outf) {
  constexpr int64_t D = 16 * NV;
  float* out = outf + (h * group + g0) * D;
  const float* p = scores + (h * group + g0) * ctx_len + pos0;
  __m512 acc[GN][NV];
  for (int g = 0; g < GN; ++g)
    for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_loadu_ps(out + g * D + 16 * v);
  for (int t = 0; t < n; ++t) {
    const T* row = values(pos0 + t, h);
    __m512 x[NV];
    Rows<T>::template load<NV>(row, x);
    for (int g = 0; g < GN; ++g) {
      const __m512 w = _mm512_set1_ps(p[g * ctx_len + t]);
      for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_fmadd_ps(w, x[v], acc[g][v]);
    }
  }
  for (int g = 0; g < GN; ++g)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + g * D + 16 * v, acc[g][v]);
}

// fn(GN, g0) over a group's query heads, GMAX at a time (GMAX * NV query vectors, or as
// many accumulators, stay in registers), a last, smaller set through its own size.
template <int GMAX, typename Fn>
void heads_avx512(int64_t group, Fn&& fn) {
  int64_t g0 = 0;
  for (; g0 + GMAX <= group; g0 += GMAX) fn(std::integral_constant<int, GMAX>{}, g0);
  const int64_t rest = group - g0;
  if constexpr (GMAX > 1) {
    if (rest == 1) fn(std::integral_constant<int, 1>{}, g0);
  }
  if constexpr (GMAX > 2) {
    if (rest == 2) fn(std::integral_constant<int, 2>{}, g0);
  }
  if constexpr (GMAX > 3) {
    if (rest == 3) fn(std::integral_constant<int, 3>{}, g0);
  }
}

// One request's KV heads [h0, h1), all their query heads: keys in runs of 16 positions,
// each run read for every head before the next, so that a block's heads, contiguous in the
// cache, are read in one sweep (reading one head's tiles alone, a third of each block, ran
// at ~10 GB/s on one core against ~27 for a contiguous read).
template <typename T, typename C, int NV>
void decode_request_avx512(const T* q, const C* k_cache, const C* v_cache,
                           const int64_t* table, int64_t ctx_len, int64_t h0, int64_t h1,
                           int64_t group, int64_t block_size, int64_t block_stride,
                           float scale, float out_scale, float* qf, float* scores, float* outf,
                           float* inv_sum, T* out) {
  constexpr int64_t D = 16 * NV;
  constexpr int GMAX = NV <= 4 ? 4 : 2;
  const int64_t shift = __builtin_ctzll(block_size), head_stride = block_size * D;
  const PagedRows<C> keys{k_cache, table, shift, block_size - 1, block_stride, head_stride, D};
  const PagedRows<C> values{v_cache, table, shift, block_size - 1, block_stride, head_stride, D};
  const int64_t ahead = kAhead * block_size;
  auto prefetch = [&](const PagedRows<C>& rows, int64_t pos0, int64_t n) {
    for (int64_t pos = pos0; pos < std::min(pos0 + n, ctx_len); ++pos)
      for (int64_t h = h0; h < h1; ++h) prefetch_row(rows(pos, h), D);
  };
  scale *= Rows<C>::factor;  // the rows are widened `factor` times smaller
  out_scale *= Rows<C>::factor;
  for (int64_t i = h0 * group * D; i < h1 * group * D; ++i) qf[i] = static_cast<float>(q[i]) * scale;
  prefetch(keys, 0, ahead);
  for (int64_t pos0 = 0; pos0 < ctx_len; pos0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, ctx_len - pos0));
    prefetch(keys, pos0 + ahead, 16);
    for (int64_t h = h0; h < h1; ++h)
      heads_avx512<GMAX>(group, [&](auto gn, int64_t g0) {
        scores_avx512<C, NV, decltype(gn)::value>(qf, keys, h, group, g0, pos0, n, ctx_len,
                                                  scores);
      });
  }
  prefetch(values, 0, ahead);  // while the softmax runs
  for (int64_t g = h0 * group; g < h1 * group; ++g) {
    float* s = scores + g * ctx_len;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < ctx_len; ++i) m = std::max(m, s[i]);
    inv_sum[g] = 1.f / exp_sum(s, ctx_len, m);
  }
  std::fill(outf + h0 * group * D, outf + h1 * group * D, 0.f);
  for (int64_t pos0 = 0; pos0 < ctx_len; pos0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, ctx_len - pos0));
    prefetch(values, pos0 + ahead, 16);
    for (int64_t h = h0; h < h1; ++h)
      heads_avx512<GMAX>(group, [&](auto gn, int64_t g0) {
        weighted_sum_avx512<C, NV, decltype(gn)::value>(scores, values, h, group, g0, pos0, n,
                                                        ctx_len, outf);
      });
  }
  for (int64_t i = h0 * group * D; i < h1 * group * D; ++i)
    out[i] = static_cast<T>(outf[i] * inv_sum[i / D] * out_scale);
}
#endif

// The body, for queries (and outputs) of type T over a cache of type C: the query's own
// dtype, or a float8 (FP8 KV cache) widened in registers as it is read.
template <typename T, typename C>
void decode_batch(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const int64_t* lens_ptr, int64_t max_ctx,
                  float scale, float out_scale, at::Tensor& out) {
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  const T* q_ptr = q.data_ptr<T>();
  const C* k_ptr = reinterpret_cast<const C*>(k_cache.data_ptr());
  const C* v_ptr = reinterpret_cast<const C*>(v_cache.data_ptr());
  const int64_t* table_ptr = block_tables.data_ptr<int64_t>();
  T* out_ptr = out.data_ptr<T>();
  const int64_t block_stride = num_kv_heads * block_size * head_dim;
#ifdef __AVX512F__
  if constexpr (!std::is_same_v<T, double>) {
    if (head_dim == 64 || head_dim == 128) {
      // A request at a time, all its heads; its heads split over the threads only when
      // there are fewer requests than threads.
      const int64_t splits = batch >= at::get_num_threads() ? 1 : num_kv_heads;
      auto request_fn = head_dim == 64 ? decode_request_avx512<T, C, 4>
                                       : decode_request_avx512<T, C, 8>;
      at::parallel_for(0, batch * splits, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> qf(num_heads * head_dim), outf(num_heads * head_dim);
        std::vector<float> scores(num_heads * max_ctx), inv_sum(num_heads);
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / splits, part = item % splits;
          const int64_t offset = b * num_heads * head_dim;
          request_fn(q_ptr + offset, k_ptr, v_ptr, table_ptr + b * max_blocks, lens_ptr[b],
                     part * num_kv_heads / splits, (part + 1) * num_kv_heads / splits, group,
                     block_size, block_stride, scale, out_scale, qf.data(), scores.data(),
                     outf.data(), inv_sum.data(), out_ptr + offset);
        }
      });
      return;
    }
  }
#endif
  at::parallel_for(0, batch * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * head_dim), acc(group * head_dim);
    std::vector<float> scores(group * max_ctx);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / num_kv_heads, h = item % num_kv_heads;
      const int64_t offset = (b * num_heads + h * group) * head_dim;
      auto item_fn = head_dim == 64    ? decode_item<T, C, 64>
                     : head_dim == 128 ? decode_item<T, C, 128>
                                       : decode_item<T, C, 0>;
      item_fn(q_ptr + offset, k_ptr, v_ptr, table_ptr + b * max_blocks, lens_ptr[b], group,
              head_dim, block_size, block_stride, h * block_size * head_dim, scale, out_scale,
              qf.data(), scores.data(), acc.data(), out_ptr + offset);
    }
  });
}

// `scale` multiplies the scores (the softmax scale, times k_scale for an FP8 cache) and
// `v_scale` the outputs.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, double scale, double v_scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous (B, H, D) tensor");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "the caches must be contiguous (num_blocks, Hkv, block_size, D) tensors");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache differ in shape");
  const auto cache_type = k_cache.scalar_type();
  const bool fp8 = cache_type == at::kFloat8_e4m3fn || cache_type == at::kFloat8_e5m2;
  TORCH_CHECK((q.scalar_type() == cache_type || fp8) && cache_type == v_cache.scalar_type(),
              "the caches must be of q's dtype, or both float8");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() &&
                  block_tables.dim() == 2 && block_tables.size(0) == q.size(0),
              "block_tables must be a contiguous (B, max_blocks) int64 tensor");
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.numel() == q.size(0),
              "context_lens must be a (B,) int64 tensor");
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim, "head_dim differs between q and the cache");
  TORCH_CHECK(num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(num_heads / num_kv_heads <= 64, "more than 64 query heads per KV head");
  const int64_t max_blocks = block_tables.size(1);
  const at::Tensor lens = context_lens.contiguous();
  const int64_t* lens_ptr = lens.data_ptr<int64_t>();
  int64_t max_ctx = 1;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lens_ptr[b] >= 1 && lens_ptr[b] <= max_blocks * block_size,
                "context_lens out of the block table's range");
    max_ctx = std::max(max_ctx, lens_ptr[b]);
  }
  at::Tensor out = at::empty_like(q);
  const float s = static_cast<float>(scale), vs = static_cast<float>(v_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
        if (cache_type == at::kFloat8_e4m3fn)
          decode_batch<scalar_t, c10::Float8_e4m3fn>(q, k_cache, v_cache, block_tables,
                                                     lens_ptr, max_ctx, s, vs, out);
        else if (cache_type == at::kFloat8_e5m2)
          decode_batch<scalar_t, c10::Float8_e5m2>(q, k_cache, v_cache, block_tables, lens_ptr,
                                                   max_ctx, s, vs, out);
        else
          decode_batch<scalar_t, scalar_t>(q, k_cache, v_cache, block_tables, lens_ptr,
                                           max_ctx, s, vs, out);
      });
  return out;
}


#if defined(__AVX512F__) && defined(__AVX512BF16__)
// Prefill attention in bf16 with AVX-512 BF16's dot products (vdpbf16ps: 32 bf16 products
// summed pairwise into 16 fp32 lanes): q (T, H, D), k and v (Hkv, S, D), query i at position
// S - T + i attending keys [0, S - T + i] (causal), or all S keys (an encoder's). Torch's CPU flash attention runs
// bf16 at its fp32 speed (~59 GFLOP/s on one core); this multiplies in bf16 and keeps the
// softmax in fp32, rounding the probabilities to bf16 for the second product, as flash
// attention does on GPUs. Work items: (KV head, block of kQueryRows queries) with all the
// query heads of the group; K and V are first repacked per head into the pair layouts the
// dot product takes (keys in 16s, K transposed; V interleaved by key pairs).
constexpr int64_t kQueryRows = 8;

inline __m512 scores_tail_mask(__m512 x, int64_t first_key, int64_t limit) {
  // -inf from key `limit` on, for the 16 keys starting at first_key
  const int64_t n = std::clamp<int64_t>(limit - first_key, 0, 16);
  const __mmask16 keep = static_cast<__mmask16>((1u << n) - 1);
  return _mm512_mask_blend_ps(keep, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), x);
}

template <int NV>
void prefill_item_bf16(const uint16_t* q, const uint32_t* kp, const uint32_t* vp, int64_t h,
                       int64_t i0, int64_t i1, int64_t T, int64_t S, int64_t H, int64_t group,
                       int64_t s_pad, float scale, bool causal, float* sc, uint16_t* pb,
                       float* inv, uint16_t* out) {
  constexpr int64_t D = 16 * NV, DP = D / 2;
  const int64_t rows = (i1 - i0) * group;  // query rows: (query, head of the group)
  const int64_t keys = causal ? S - T + i1 : S;  // keys the last query sees
  const int64_t kblocks = (keys + 15) / 16;
  auto q_row = [&](int64_t r) { return q + ((i0 + r / group) * H + h * group + r % group) * D; };
  auto limit = [&](int64_t r) { return causal ? S - T + i0 + r / group + 1 : S; };
  // Scores: SR query rows x 2 key blocks at a time (2 * SR accumulators).
  constexpr int64_t SR = 8;
  for (int64_t r0 = 0; r0 < rows; r0 += SR) {
    const int64_t nr = std::min<int64_t>(SR, rows - r0);
    const uint32_t* qr[SR];
    for (int64_t r = 0; r < SR; ++r)
      qr[r] = reinterpret_cast<const uint32_t*>(q_row(r0 + std::min(r, nr - 1)));
    for (int64_t kb = 0; kb < kblocks; kb += 2) {
      const bool two = kb + 1 < kblocks;
      __m512 acc[SR][2];
      for (int r = 0; r < SR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      const uint32_t* k0 = kp + (h * (s_pad / 16) + kb) * DP * 16;
      const uint32_t* k1 = k0 + DP * 16;
      for (int64_t dp = 0; dp < DP; ++dp) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(k0 + dp * 16);
        const __m512bh b1 = two ? (__m512bh)_mm512_loadu_si512(k1 + dp * 16) : b0;
        for (int r = 0; r < SR; ++r) {
          const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(qr[r][dp]));
          acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
          acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
        }
      }
      const __m512 vs = _mm512_set1_ps(scale);
      for (int64_t r = 0; r < nr; ++r) {
        float* row = sc + (r0 + r) * s_pad;
        const int64_t lim = limit(r0 + r);
        _mm512_storeu_ps(row + kb * 16,
                         scores_tail_mask(_mm512_mul_ps(acc[r][0], vs), kb * 16, lim));
        if (two)
          _mm512_storeu_ps(row + kb * 16 + 16,
                           scores_tail_mask(_mm512_mul_ps(acc[r][1], vs), kb * 16 + 16, lim));
      }
    }
  }
  // Softmax (fp32), probabilities rounded to bf16; zero past each row's keys.
  const int64_t kpad = kblocks * 16;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = sc + r * s_pad;
    const int64_t lim = limit(r);
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < lim; ++j) m = std::max(m, row[j]);
    inv[r] = 1.f / exp_sum(row, lim, m);
    std::fill(row + lim, row + kpad, 0.f);
    uint16_t* prow = pb + r * s_pad;
    for (int64_t j = 0; j < kpad; j += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(prow + j),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(row + j)));
  }
  // Output: PR query rows x D at a time (PR * NV accumulators), keys in pairs.
  constexpr int64_t PR = NV <= 4 ? 4 : 2;
  const int64_t kpairs = kpad / 2;
  for (int64_t r0 = 0; r0 < rows; r0 += PR) {
    const int64_t nr = std::min<int64_t>(PR, rows - r0);
    const uint32_t* pr[PR];
    for (int64_t r = 0; r < PR; ++r)
      pr[r] = reinterpret_cast<const uint32_t*>(pb + (r0 + std::min(r, nr - 1)) * s_pad);
    __m512 acc[PR][NV];
    for (int r = 0; r < PR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
    const uint32_t* vh = vp + h * (s_pad / 2) * D;
    for (int64_t kpi = 0; kpi < kpairs; ++kpi) {
      __m512bh b[NV];
      for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(vh + (kpi * NV + v) * 16);
      for (int r = 0; r < PR; ++r) {
        const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pr[r][kpi]));
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      uint16_t* o = out + (q_row(r0 + r) - q);
      const __m512 s = _mm512_set1_ps(inv[r0 + r]);
      for (int v = 0; v < NV; ++v)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * v),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][v], s)));
    }
  }
}

// One value of K or V as the bf16 bits the kernel multiplies: bf16 as it is; a float8
// widened and scaled back, rounded to nearest.
template <typename C>
inline uint32_t bf16_bits(C x, float) {
  return static_cast<uint32_t>(x.x);
}
template <>
inline uint32_t bf16_bits<c10::Float8_e4m3fn>(c10::Float8_e4m3fn x, float s) {
  return c10::BFloat16(static_cast<float>(x) * s).x;
}
template <>
inline uint32_t bf16_bits<c10::Float8_e5m2>(c10::Float8_e5m2 x, float s) {
  return c10::BFloat16(static_cast<float>(x) * s).x;
}

// K as (Hkv, S/16, D/2, 16) bf16 pairs; V as (Hkv, S/2, D/16, 16) pairs of keys.
template <typename C>
void repack_kv(const C* kd, const C* vd, float ks, float vs, int64_t Hkv, int64_t S, int64_t D,
               int64_t s_pad, uint32_t* kp, uint32_t* vp) {
  at::parallel_for(0, Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      for (int64_t j = 0; j < S; ++j) {
        const C* krow = kd + (h * S + j) * D;
        uint32_t* kblock = kp + (h * (s_pad / 16) + j / 16) * (D / 2) * 16;
        for (int64_t dp = 0; dp < D / 2; ++dp)
          kblock[dp * 16 + j % 16] = bf16_bits(krow[2 * dp], ks) | (bf16_bits(krow[2 * dp + 1], ks) << 16);
        const C* vrow = vd + (h * S + j) * D;
        uint16_t* vpair = reinterpret_cast<uint16_t*>(vp + (h * (s_pad / 2) + j / 2) * D);
        for (int64_t d = 0; d < D; ++d) vpair[2 * d + (j % 2)] = static_cast<uint16_t>(bf16_bits(vrow[d], vs));
      }
    }
  });
}

// K and V come in bf16, or in float8 (an FP8 KV cache's gathered context) with their scales:
// widened and scaled as they are repacked (the repack writes the kernel's bf16 operands
// anyway, so there is no widened copy besides them).
at::Tensor prefill_attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  double scale, bool causal, double k_scale, double v_scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be a contiguous (T, H, D) tensor");
  TORCH_CHECK(k.dim() == 3 && k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes(),
              "k and v must be contiguous (Hkv, S, D) tensors of one shape");
  const auto kv_type = k.scalar_type();
  const bool fp8 = kv_type == at::kFloat8_e4m3fn || kv_type == at::kFloat8_e5m2;
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && (kv_type == at::kBFloat16 || fp8) &&
                  v.scalar_type() == kv_type,
              "prefill_attention_bf16 takes bf16 tensors (k and v may be float8)");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k.size(0), S = k.size(1);
  TORCH_CHECK(k.size(2) == D && (D == 32 || D == 64 || D == 128),
              "head size must be 32, 64 or 128");
  TORCH_CHECK(H % Hkv == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(T >= 1 && S >= T, "need 1 <= T <= S (queries are the last T positions)");
  const int64_t group = H / Hkv, s_pad = (S + 31) / 32 * 32;
  // K as (Hkv, S/16, D/2, 16) bf16 pairs; V as (Hkv, S/2, D/16, 16) pairs of keys. Zero-padded.
  std::vector<uint32_t> kp(Hkv * s_pad * D / 2, 0), vp(Hkv * s_pad * D / 2, 0);
  auto repack = [&](auto tag) {
    using C = decltype(tag);
    repack_kv<C>(reinterpret_cast<const C*>(k.data_ptr()), reinterpret_cast<const C*>(v.data_ptr()),
                 static_cast<float>(k_scale), static_cast<float>(v_scale), Hkv, S, D, s_pad,
                 kp.data(), vp.data());
  };
  if (kv_type == at::kFloat8_e4m3fn)
    repack(c10::Float8_e4m3fn{});
  else if (kv_type == at::kFloat8_e5m2)
    repack(c10::Float8_e5m2{});
  else
    repack(c10::BFloat16{});
  at::Tensor out = at::empty_like(q);
  const uint16_t* qd = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  uint16_t* od = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t qblocks = (T + kQueryRows - 1) / kQueryRows;
  auto item_fn = D == 32   ? prefill_item_bf16<2>
                 : D == 64 ? prefill_item_bf16<4>
                           : prefill_item_bf16<8>;
  at::parallel_for(0, Hkv * qblocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows = kQueryRows * group;
    std::vector<float> sc(rows * s_pad), inv(rows);
    std::vector<uint16_t> pb(rows * s_pad);
    for (int64_t item = begin; item < end; ++item) {
      // The longest blocks (the last queries) first, for the thread pool's balance.
      const int64_t h = item % Hkv, qb = qblocks - 1 - item / Hkv;
      const int64_t i0 = qb * kQueryRows, i1 = std::min(T, i0 + kQueryRows);
      item_fn(qd, kp.data(), vp.data(), h, i0, i1, T, S, H, group, s_pad,
              static_cast<float>(scale), causal, sc.data(), pb.data(), inv.data(), od);
    }
  });
  return out;
}
#endif

// RMSNorm over the last dim, rounded as Hugging Face's: w * (x * rsqrt(mean(x^2) + eps)),
// in fp32. With `residual`: residual += x first (in place), and the sum is normalized: the
// residual add and the norm after it in one pass over the row (vLLM's fused_add_rms_norm).
template <typename T>
void rms_norm_rows(const T* x, T* residual, const T* weight, T* out, int64_t rows,
                   int64_t hidden, float eps) {
  const int64_t grain = std::max<int64_t>(1, 16384 / hidden);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> row(hidden);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * hidden;
      if (residual) {
        T* rr = residual + r * hidden;
        for (int64_t i = 0; i < hidden; ++i) {
          rr[i] = static_cast<T>(static_cast<float>(rr[i]) + static_cast<float>(xr[i]));
          row[i] = static_cast<float>(rr[i]);
        }
      } else {
        for (int64_t i = 0; i < hidden; ++i) row[i] = static_cast<float>(xr[i]);
      }
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < hidden; ++i) sum += row[i] * row[i];
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(hidden) + eps);
      T* o = out + r * hidden;
      for (int64_t i = 0; i < hidden; ++i)
        o[i] = static_cast<T>(static_cast<float>(weight[i]) *
                              static_cast<float>(static_cast<T>(row[i] * inv)));
    }
  });
}

void check_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.is_contiguous() && x.dim() >= 1, "x must be contiguous");
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "weight must be a contiguous (hidden,) tensor");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight differ in dtype");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  at::Tensor out = at::empty_like(x);
  const int64_t hidden = x.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), nullptr, weight.data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), x.numel() / hidden, hidden,
                            static_cast<float>(eps));
  });
  return out;
}

at::Tensor add_rms_norm(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                        double eps) {
  check_norm_args(x, weight);
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes() &&
                  residual.scalar_type() == x.scalar_type(),
              "residual must be contiguous, shaped and typed as x");
  at::Tensor out = at::empty_like(x);
  const int64_t hidden = x.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(),
                            weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                            x.numel() / hidden, hidden, static_cast<float>(eps));
  });
  return out;
}

// logits[rows[i], t] = -inf wherever bit t of bitmask[i] is clear: token t in int32 word
// t / 32, bit t % 32 (xgrammar's and llguidance's layout). In place; fp32 logits.
void apply_token_bitmask(at::Tensor& logits, const at::Tensor& rows, const at::Tensor& bitmask) {
  TORCH_CHECK(logits.is_contiguous() && logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "logits must be contiguous (N, vocab) fp32");
  TORCH_CHECK(rows.is_contiguous() && rows.dim() == 1 && rows.scalar_type() == at::kLong,
              "rows must be a contiguous int64 vector");
  TORCH_CHECK(bitmask.is_contiguous() && bitmask.dim() == 2 &&
                  bitmask.scalar_type() == at::kInt && bitmask.size(0) == rows.size(0),
              "bitmask must be contiguous int32, one row per entry of rows");
  const int64_t n = logits.size(0), vocab = logits.size(1), words = bitmask.size(1);
  TORCH_CHECK(words * 32 >= vocab, "bitmask rows must cover the vocabulary");
  const int64_t* row_ids = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.size(0); ++i)
    TORCH_CHECK(row_ids[i] >= 0 && row_ids[i] < n, "rows must index the logits");
  float* out = logits.data_ptr<float>();
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>());
  const float ninf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, rows.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = out + row_ids[i] * vocab;
      const uint32_t* w = bits + i * words;
      int64_t t = 0;
#ifdef __AVX512F__
      const __m512 neg = _mm512_set1_ps(ninf);
      for (; t + 32 <= vocab; t += 32) {
        const uint32_t ban = ~w[t / 32];
        if (ban == 0) continue;
        _mm512_mask_storeu_ps(row + t, static_cast<__mmask16>(ban & 0xFFFF), neg);
        _mm512_mask_storeu_ps(row + t + 16, static_cast<__mmask16>(ban >> 16), neg);
      }
#endif
      for (; t < vocab; ++t)
        if (!((w[t / 32] >> (t % 32)) & 1u)) row[t] = ninf;
    }
  });
}


// LoRA: y[row] += B[slot] (A[slot] x[row]) for every row whose slot >= 0, where A (L, R, in)
// stacks the shards' rank blocks (R = shards x rank) and Bt (L, R, out) is B transposed, rank
// block i nonzero only in shard i's columns (only those are read). In fp32; y rounded once.
constexpr int kLoRATile = 4;
// GCC's vectors, one register wide: 16 floats with AVX-512, 8 with AVX2
#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float fvec __attribute__((vector_size(kLanes * 4)));

template <typename T>
inline fvec load_lanes(const T* p) {
  float f[kLanes];
  for (int c = 0; c < kLanes; ++c) f[c] = static_cast<float>(p[c]);
  fvec v;
  std::memcpy(&v, f, sizeof(v));
  return v;
}

template <>
inline fvec load_lanes<float>(const float* p) {
  fvec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// bf16 widened by a shift (its bits are the float's upper half): one load, one shuffle
template <>
inline fvec load_lanes<c10::BFloat16>(const c10::BFloat16* p) {
#ifdef __AVX512F__
  const __m512 f = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
#else
  const __m256 f = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
#endif
  fvec v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
}

inline float hsum(fvec v) {
  float s = 0.f;
  for (int c = 0; c < kLanes; ++c) s += v[c];
  return s;
}

template <typename T>
void lora_tile(T* y, const T* x, const T* a, const T* bt, const int64_t* rows, int n,
               int64_t in, int64_t out, int64_t R, const std::vector<int64_t>& shard_cols,
               std::vector<float>& t, std::vector<float>& acc) {
  const T* xs[kLoRATile];
  for (int i = 0; i < kLoRATile; ++i) xs[i] = x + rows[std::min(i, n - 1)] * in;
  // shrink: t[i][j] = A[j] . x[i], two rank rows and four x rows per sweep
  const int64_t in16 = in - in % kLanes;
  for (int64_t j = 0; j < R; j += 2) {
    const T* a0 = a + j * in;
    const T* a1 = a + std::min(j + 1, R - 1) * in;
    fvec s[2][kLoRATile] = {};
    for (int64_t d = 0; d < in16; d += kLanes) {
      const fvec v0 = load_lanes(a0 + d), v1 = load_lanes(a1 + d);
      for (int i = 0; i < kLoRATile; ++i) {
        const fvec xv = load_lanes(xs[i] + d);
        s[0][i] += v0 * xv;
        s[1][i] += v1 * xv;
      }
    }
    for (int h = 0; h < 2 && j + h < R; ++h)
      for (int i = 0; i < kLoRATile; ++i) {
        float sum = hsum(s[h][i]);
        const T* ah = h ? a1 : a0;
        for (int64_t d = in16; d < in; ++d)
          sum += static_cast<float>(ah[d]) * static_cast<float>(xs[i][d]);
        t[i * R + j + h] = sum;
      }
  }
  // expand, shard by shard: two vectors of columns of the four rows held while the rank
  // block streams by
  const int64_t shards = static_cast<int64_t>(shard_cols.size()) - 1, r = R / shards;
  for (int64_t s = 0; s < shards; ++s) {
    const int64_t c_end = shard_cols[s + 1];
    int64_t c0 = shard_cols[s];
    for (; c0 + 2 * kLanes <= c_end; c0 += 2 * kLanes) {
      fvec p[2][kLoRATile] = {};
      for (int64_t k = s * r; k < (s + 1) * r; ++k) {
        const T* b = bt + k * out + c0;
        const fvec b0 = load_lanes(b), b1 = load_lanes(b + kLanes);
        for (int i = 0; i < kLoRATile; ++i) {
          p[0][i] += t[i * R + k] * b0;
          p[1][i] += t[i * R + k] * b1;
        }
      }
      for (int i = 0; i < kLoRATile; ++i) {
        std::memcpy(acc.data() + i * out + c0, &p[0][i], sizeof(fvec));
        std::memcpy(acc.data() + i * out + c0 + kLanes, &p[1][i], sizeof(fvec));
      }
    }
    for (; c0 < c_end; ++c0)
      for (int i = 0; i < kLoRATile; ++i) {
        float sum = 0.f;
        for (int64_t k = s * r; k < (s + 1) * r; ++k)
          sum += t[i * R + k] * static_cast<float>(bt[k * out + c0]);
        acc[i * out + c0] = sum;
      }
  }
  for (int i = 0; i < n; ++i) {
    T* yr = y + rows[i] * out;
    const float* ar = acc.data() + i * out;
    for (int64_t c = 0; c < out; ++c)
      yr[c] = static_cast<T>(static_cast<float>(yr[c]) + ar[c]);
  }
}

void lora_shrink_expand(at::Tensor& y, const at::Tensor& x, const at::Tensor& a,
                        const at::Tensor& bt, const at::Tensor& row_slots,
                        at::IntArrayRef shard_sizes) {
  TORCH_CHECK(x.is_contiguous() && x.dim() == 2, "x must be contiguous (rows, in)");
  TORCH_CHECK(y.is_contiguous() && y.dim() == 2 && y.size(0) == x.size(0),
              "y must be contiguous (rows, out)");
  TORCH_CHECK(a.is_contiguous() && a.dim() == 3 && a.size(2) == x.size(1),
              "a must be contiguous (slots, R, in)");
  TORCH_CHECK(bt.is_contiguous() && bt.dim() == 3 && bt.size(0) == a.size(0) &&
                  bt.size(1) == a.size(1) && bt.size(2) == y.size(1),
              "bt must be contiguous (slots, R, out)");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && a.scalar_type() == y.scalar_type() &&
                  bt.scalar_type() == y.scalar_type(),
              "x, y, a and bt must share a dtype");
  TORCH_CHECK(row_slots.is_contiguous() && row_slots.scalar_type() == at::kLong &&
                  row_slots.dim() == 1 && row_slots.size(0) >= x.size(0),
              "row_slots must be a contiguous int64 vector, one per row");
  const int64_t rows = x.size(0), in = x.size(1), out = y.size(1), R = a.size(1);
  const int64_t slots = a.size(0), shards = static_cast<int64_t>(shard_sizes.size());
  TORCH_CHECK(shards >= 1 && R % shards == 0, "R must split evenly over the shards");
  std::vector<int64_t> shard_cols{0};
  for (int64_t s : shard_sizes) shard_cols.push_back(shard_cols.back() + s);
  TORCH_CHECK(shard_cols.back() == out, "the shard sizes must add up to out");
  // rows grouped by slot, then cut into tiles
  const int64_t* slot_of = row_slots.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> by_slot(slots);
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK(slot_of[i] < slots, "a row's slot is out of range");
    if (slot_of[i] >= 0) by_slot[slot_of[i]].push_back(i);
  }
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (slot, first index in by_slot[slot])
  for (int64_t s = 0; s < slots; ++s)
    for (int64_t i = 0; i < static_cast<int64_t>(by_slot[s].size()); i += kLoRATile)
      tiles.emplace_back(s, i);
  if (tiles.empty()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "lora", [&] {
    using T = scalar_t;
    T* yp = y.data_ptr<T>();
    const T *xp = x.data_ptr<T>(), *ap = a.data_ptr<T>(), *bp = bt.data_ptr<T>();
    at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> t(kLoRATile * R), acc(kLoRATile * out);
      for (int64_t k = begin; k < end; ++k) {
        const auto [s, first] = tiles[k];
        const auto& members = by_slot[s];
        const int n = static_cast<int>(
            std::min<int64_t>(kLoRATile, static_cast<int64_t>(members.size()) - first));
        lora_tile<T>(yp, xp, ap + s * R * in, bp + s * R * out, members.data() + first, n, in,
                     out, R, shard_cols, t, acc);
      }
    });
  });
}

// A decode-only batch's attention, from its fused q/k/v projection, in one call: RoPE on q and
// k, k and v written into their cache slots, then paged_decode_attention for each group of
// rows (groups share a padded block table). Torch's path is ~20 small ops a layer (split,
// view, cat, mul, add, index_copy, slices), which at one row cost more than the attention.
// RoPE rounds as HF's x * cos + rotate_half(x) * sin does in x's dtype: each product, then
// their sum (no FMA: contraction is off here).
template <typename T>
__attribute__((optimize("fp-contract=off"))) void rope_and_cache(
    const T* qkv, const T* cos, const T* sin, T* q_out, T* k_cache, T* v_cache,
    const int64_t* slots, int64_t tokens, int64_t num_heads, int64_t num_kv_heads,
    int64_t head_dim, int64_t block_size) {
  const int64_t width = (num_heads + 2 * num_kv_heads) * head_dim, half = head_dim / 2;
  for (int64_t t = 0; t < tokens; ++t) {
    const T* row = qkv + t * width;
    const T *c = cos + t * head_dim, *sn = sin + t * head_dim;
    const int64_t block = slots[t] / block_size, offset = slots[t] % block_size;
    auto cache_row = [&](T* cache, int64_t h) {
      return cache + ((block * num_kv_heads + h) * block_size + offset) * head_dim;
    };
    for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
      const T* x = row + h * head_dim;
      T* dst = h < num_heads ? q_out + (t * num_heads + h) * head_dim
                             : cache_row(k_cache, h - num_heads);
      for (int64_t d = 0; d < head_dim; ++d) {
        const T a = static_cast<T>(static_cast<float>(x[d]) * static_cast<float>(c[d]));
        const T swapped = x[d < half ? d + half : d - half];
        const T b = static_cast<T>(static_cast<float>(swapped) * static_cast<float>(sn[d]));
        dst[d] = static_cast<T>(static_cast<float>(a) + static_cast<float>(b));
      }
    }
    const T* v = row + (num_heads + num_kv_heads) * head_dim;
    for (int64_t h = 0; h < num_kv_heads; ++h)
      std::memcpy(cache_row(v_cache, h), v + h * head_dim, head_dim * sizeof(T));
  }
}

at::Tensor decode_attention_rope(const at::Tensor& qkv, const at::Tensor& cos,
                                 const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                                 const at::Tensor& slots, at::TensorList block_tables,
                                 at::TensorList context_lens, int64_t num_heads, double scale) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous(), "qkv must be a contiguous (T, width) tensor");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes(),
              "the caches must be contiguous (num_blocks, Hkv, block_size, D) tensors alike");
  const auto t = qkv.scalar_type();
  TORCH_CHECK(k_cache.scalar_type() == t && v_cache.scalar_type() == t && cos.scalar_type() == t &&
                  sin.scalar_type() == t,
              "cos, sin and the caches must be of qkv's dtype");
  const int64_t tokens = qkv.size(0), num_kv_heads = k_cache.size(1);
  const int64_t block_size = k_cache.size(2), head_dim = k_cache.size(3);
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim && head_dim % 2 == 0,
              "qkv's width is not (num_heads + 2 Hkv) x head_dim");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == tokens * head_dim &&
                  sin.numel() == tokens * head_dim,
              "cos and sin must be contiguous, head_dim values a token");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() &&
                  slots.numel() == tokens,
              "slots must be a (T,) int64 tensor");
  TORCH_CHECK(block_tables.size() == context_lens.size(), "one context_lens per block table");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * block_size;
  for (int64_t i = 0; i < tokens; ++i)
    TORCH_CHECK(sp[i] >= 0 && sp[i] < num_slots, "a slot outside the cache");
  at::Tensor q = at::empty({tokens, num_heads, head_dim}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t, "decode_attention_rope", [&] {
    rope_and_cache<scalar_t>(qkv.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(),
                             sin.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                             k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), sp,
                             tokens, num_heads, num_kv_heads, head_dim, block_size);
  });
  at::Tensor out = at::empty({tokens, num_heads * head_dim}, qkv.options());
  int64_t start = 0;
  for (size_t g = 0; g < block_tables.size(); ++g) {
    const int64_t end = start + block_tables[g].size(0);
    TORCH_CHECK(end <= tokens, "the groups' rows exceed the batch");
    const at::Tensor o = paged_decode_attention(q.slice(0, start, end), k_cache, v_cache,
                                                block_tables[g], context_lens[g], scale, 1.0);
    out.slice(0, start, end).copy_(o.view({end - start, num_heads * head_dim}));
    start = end;
  }
  TORCH_CHECK(start == tokens, "the groups must cover every row of the batch");
  return out;
}

// A linear layer at a few rows (decode): y = x W^T (+ b), W as loaded, (out, in). A product
// this thin reads every weight once and is bound by memory bandwidth: MKL's and oneDNN's
// one-row products stay on one core whatever the thread count; this one splits W's rows over
// the threads. Each weight row is read straight through, once for all R rows of x, one row
// after the other: reading a tile of several rows in step (four, as this kernel first did)
// ran at half the bandwidth on a 2-core EPYC (SmolLM2's layers at one row, one thread, fp32:
// 45.9 -> 23.0 ms a step). Two sums per row of x, alternating, hide the FMA's latency. Sums
// in fp32, each one thread's, in a fixed order.
constexpr int64_t kMaxLinearRows = 4;

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// bf16 weights and bf16 rows (a bf16 model's activations): vdpbf16ps multiplies 32 pairs
// a step, exactly, into 16 fp32 sums, where widening each weight to fp32 first costs a
// shuffle and two FMAs per 32 weights.
template <int R>
inline void linear_row_bf16(const c10::BFloat16* x, const c10::BFloat16* w, const float* b,
                            c10::BFloat16* y, int64_t in, int64_t out, int64_t o) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const c10::BFloat16* wo = w + o * in;
  int64_t k = 0;
  for (; k + 64 <= in; k += 64) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wo + k);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wo + k + 32);
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, (__m512bh)_mm512_loadu_si512(x + r * in + k));
      acc[r][1] =
          _mm512_dpbf16_ps(acc[r][1], w1, (__m512bh)_mm512_loadu_si512(x + r * in + k + 32));
    }
  }
  if (k + 32 <= in) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wo + k);
    for (int r = 0; r < R; ++r)
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, (__m512bh)_mm512_loadu_si512(x + r * in + k));
    k += 32;
  }
  for (int r = 0; r < R; ++r) {
    float s = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
    for (int64_t kk = k; kk < in; ++kk)
      s += static_cast<float>(x[r * in + kk]) * static_cast<float>(wo[kk]);
    y[r * out + o] = static_cast<c10::BFloat16>(b == nullptr ? s : s + b[o]);
  }
}

template <int R>
void linear_rows_bf16(const c10::BFloat16* x, const c10::BFloat16* w, const float* b,
                      c10::BFloat16* y, int64_t in, int64_t out) {
  const int64_t grain = std::max<int64_t>(1, (32 << 10) / (in * 2));  // 32 KiB a task at least
  at::parallel_for(0, out, grain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) linear_row_bf16<R>(x, w, b, y, in, out, o);
  });
}
#endif

template <typename T, int R>
inline void linear_row(const float* x, const T* w, float* y, int64_t in, int64_t out,
                       int64_t o) {
  fvec acc[R][2] = {};
  const T* wo = w + o * in;
  int64_t k = 0;
  for (; k + 2 * kLanes <= in; k += 2 * kLanes) {
    const fvec w0 = load_lanes<T>(wo + k), w1 = load_lanes<T>(wo + k + kLanes);
    for (int r = 0; r < R; ++r) {
      acc[r][0] += w0 * load_lanes<float>(x + r * in + k);
      acc[r][1] += w1 * load_lanes<float>(x + r * in + k + kLanes);
    }
  }
  if (k + kLanes <= in) {
    const fvec w0 = load_lanes<T>(wo + k);
    for (int r = 0; r < R; ++r) acc[r][0] += w0 * load_lanes<float>(x + r * in + k);
    k += kLanes;
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum(acc[r][0] + acc[r][1]);
    for (int64_t kk = k; kk < in; ++kk) s += x[r * in + kk] * static_cast<float>(wo[kk]);
    y[r * out + o] = s;
  }
}

template <typename T, int R>
void linear_rows_of(const float* x, const T* w, float* y, int64_t in, int64_t out) {
  // grain: at least 32 KiB of weights per task, so a thread's share is never tiny
  const int64_t grain = std::max<int64_t>(1, (32 << 10) / (in * sizeof(T)));
  at::parallel_for(0, out, grain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) linear_row<T, R>(x, w, y, in, out, o);
  });
}

at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& w,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.is_contiguous() && x.size(1) == w.size(1),
              "x must be (rows, in) and w contiguous (out, in)");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxLinearRows, "linear_rows takes 1 to ",
              kMaxLinearRows, " rows");
  const at::ScalarType t = w.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
              "w must be float32, bfloat16 or float16");
  const int64_t rows = x.size(0), in = x.size(1), out = w.size(0);
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  if (t == at::kBFloat16 && x.scalar_type() == at::kBFloat16) {  // y in bf16, rounded once
    const at::Tensor xc = x.contiguous();
    at::Tensor yb = at::empty({rows, out}, x.options());
    at::Tensor bf;
    if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
    const auto* xp = xc.data_ptr<c10::BFloat16>();
    const auto* wp = w.data_ptr<c10::BFloat16>();
    const float* bp = bias.has_value() ? bf.data_ptr<float>() : nullptr;
    auto* yp = yb.data_ptr<c10::BFloat16>();
    switch (rows) {
      case 1: linear_rows_bf16<1>(xp, wp, bp, yp, in, out); break;
      case 2: linear_rows_bf16<2>(xp, wp, bp, yp, in, out); break;
      case 3: linear_rows_bf16<3>(xp, wp, bp, yp, in, out); break;
      default: linear_rows_bf16<4>(xp, wp, bp, yp, in, out); break;
    }
    return yb;
  }
#endif
  at::Tensor y = at::empty({rows, out}, x.options().dtype(at::kFloat));
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t, "linear_rows", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const float* xp = xf.data_ptr<float>();
      const scalar_t* wp = w.data_ptr<scalar_t>();
      float* yp = y.data_ptr<float>();
      switch (rows) {
        case 1: linear_rows_of<scalar_t, 1>(xp, wp, yp, in, out); break;
        case 2: linear_rows_of<scalar_t, 2>(xp, wp, yp, in, out); break;
        case 3: linear_rows_of<scalar_t, 3>(xp, wp, yp, in, out); break;
        default: linear_rows_of<scalar_t, 4>(xp, wp, yp, in, out); break;
      }
    }
  });
  if (bias.has_value()) y.add_(*bias);
  return y.to(x.scalar_type());
}

// A Llama-family decoder layer at a few decode rows: what DecoderLayer.forward runs op by op
// (norm, four products, RoPE and attention, SwiGLU, two residual adds), the same functions in
// the same order, so the same bits. x, the residual stream (T, hidden), is updated in place.
at::Tensor decode_layer(at::Tensor& x, const at::Tensor& input_norm, const at::Tensor& post_norm,
                        double eps, const at::Tensor& qkv_w, const c10::optional<at::Tensor>& qkv_b,
                        const at::Tensor& o_w, const at::Tensor& gate_up_w,
                        const at::Tensor& down_w, const at::Tensor& cos, const at::Tensor& sin,
                        at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots,
                        at::TensorList block_tables, at::TensorList context_lens,
                        int64_t num_heads, double scale) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (T, hidden) tensor");
  const at::Tensor qkv = linear_rows(rms_norm(x, input_norm, eps), qkv_w, qkv_b);
  const at::Tensor o = decode_attention_rope(qkv, cos, sin, k_cache, v_cache, slots,
                                             block_tables, context_lens, num_heads, scale);
  const at::Tensor h = add_rms_norm(x, linear_rows(o, o_w, c10::nullopt), post_norm, eps);
  const auto gate_up = linear_rows(h, gate_up_w, c10::nullopt).chunk(2, -1);
  return x.add_(linear_rows(at::silu(gate_up[0]).mul_(gate_up[1]), down_w, c10::nullopt));
}

// Every decoder layer of a model over a few decode rows in one call, from Python: at one row
// a layer's products take ~0.25 ms, and dispatching twelve ops from Python around them ~0.04
// ms, one op a layer ~0.03 ms. `weights`: per layer input_norm, post_norm, qkv, o, gate_up,
// down; `qkv_biases`: one per layer, or none; `caches`: per layer k_cache, v_cache.
at::Tensor decode_layers(at::Tensor& x, at::TensorList weights, at::TensorList qkv_biases,
                         at::TensorList caches, double eps, const at::Tensor& cos,
                         const at::Tensor& sin, const at::Tensor& slots,
                         at::TensorList block_tables, at::TensorList context_lens,
                         int64_t num_heads, double scale) {
  constexpr size_t kPerLayer = 6;
  const size_t layers = weights.size() / kPerLayer;
  TORCH_CHECK(weights.size() == layers * kPerLayer && caches.size() == 2 * layers &&
                  (qkv_biases.empty() || qkv_biases.size() == layers),
              "six weights and two caches a layer, and no qkv bias or one a layer");
  for (size_t l = 0; l < layers; ++l) {
    const at::Tensor* w = weights.data() + l * kPerLayer;
    at::Tensor k_cache = caches[2 * l], v_cache = caches[2 * l + 1];
    const c10::optional<at::Tensor> bias =
        qkv_biases.empty() ? c10::nullopt : c10::optional<at::Tensor>(qkv_biases[l]);
    decode_layer(x, w[0], w[1], eps, w[2], bias, w[3], w[4], w[5], cos, sin, k_cache, v_cache,
                 slots, block_tables, context_lens, num_heads, scale);
  }
  return x;
}

}  // namespace

TORCH_LIBRARY(tandem_cpu, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale, float v_scale=1.0) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  m.def(
      "prefill_attention_bf16(Tensor q, Tensor k, Tensor v, float scale, bool causal=True, "
      "float k_scale=1.0, float v_scale=1.0) -> Tensor");
#endif
  m.def("add_rms_norm(Tensor(a!) residual, Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("apply_token_bitmask(Tensor(a!) logits, Tensor rows, Tensor bitmask) -> ()");
  m.def(
      "lora_shrink_expand(Tensor(a!) y, Tensor x, Tensor a, Tensor bt, Tensor row_slots, "
      "int[] shard_sizes) -> ()");
  m.def("linear_rows(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  m.def(
      "decode_attention_rope(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor slots, Tensor[] block_tables, Tensor[] context_lens, "
      "int num_heads, float scale) -> Tensor");
  m.def(
      "decode_layers(Tensor(a!) x, Tensor[] weights, Tensor[] qkv_biases, Tensor(b!)[] caches, "
      "float eps, Tensor cos, Tensor sin, Tensor slots, Tensor[] block_tables, "
      "Tensor[] context_lens, int num_heads, float scale) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(tandem_cpu, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("rms_norm", &rms_norm);
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  m.impl("prefill_attention_bf16", &prefill_attention_bf16);
#endif
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("apply_token_bitmask", &apply_token_bitmask);
  m.impl("lora_shrink_expand", &lora_shrink_expand);
  m.impl("linear_rows", &linear_rows);
  m.impl("decode_attention_rope", &decode_attention_rope);
  m.impl("decode_layers", &decode_layers);
}
