/* Paged attention of single query rows over K/V read in place from the paged cache (float32).
 *
 * Built and loaded by kernels/cpu_native.py (gcc -O3 -march=native -fopenmp, via ctypes).
 * A "row" is one query token: it attends to keys at positions [kv_len - window, kv_len) of its
 * sequence (the whole prefix without a window). The keys of a row are cut into "items" of
 * consecutive positions so that a few long rows still spread over all threads (split-K, as in
 * flash-decoding); pass 1 runs one item per iteration, streaming its blocks (all heads) with an
 * online softmax, and writes a partial (max, sum, weighted values) per query head; pass 2
 * merges a row's partials. Every key and value of a row is read from memory once (the query
 * heads of a GQA group meet the same KV vector while it is in L1).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

#define MAX_HEADS 64    /* query heads */
#define MAX_HEAD_DIM 256
#define MAX_BLOCK 128   /* block_size */

static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

/* exp(x) for x <= 0 (a score minus the running maximum), in a form gcc vectorises (glibc's
 * expf is a scalar call per key and head, ~20 % of the kernel's time): x = n ln2 + r with
 * |r| <= ln2 / 2, exp(r) by its Taylor series to r^7 (relative error < 2e-7 on that range),
 * times 2^n built in the exponent bits. Below -87 (where expf is below FLT_MIN) it returns
 * about 1e-38 instead of 0: a weight that small adds nothing to sums of values >= 1. */
static inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = floorf(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
  return p * scale.f;
}

/* Ask for the next block's K and V (they live at a random place in the pool, so the hardware
 * prefetcher cannot guess them) while this block is being computed. */
static inline void prefetch_block(const float *key_cache, const float *value_cache,
                                  const int32_t *table, int64_t pos, int64_t end,
                                  int64_t block_size, int64_t slot_stride) {
  int64_t n = block_size - pos % block_size;
  if (n > end - pos) n = end - pos;
  const int64_t slot = (int64_t)table[pos / block_size] * block_size + pos % block_size;
  const char *k = (const char *)(key_cache + slot * slot_stride);
  const char *v = (const char *)(value_cache + slot * slot_stride);
  const int64_t bytes = n * slot_stride * (int64_t)sizeof(float);
  for (int64_t off = 0; off < bytes; off += 64) {
    __builtin_prefetch(k + off, 0, 3);
    __builtin_prefetch(v + off, 0, 3);
  }
}

int tarry_paged_rows_f32(
    const float *query,           /* [num_tokens, num_heads, head_dim], head_dim contiguous */
    int64_t q_token_stride, int64_t q_head_stride,
    const float *key_cache,       /* [num_blocks, block_size, num_kv_heads, head_dim] */
    const float *value_cache,     /* same shape, contiguous */
    const int32_t *block_tables,  /* [num_seqs, max_blocks_per_seq] */
    int64_t max_blocks_per_seq,
    const int64_t *row_query,     /* [num_rows]: the row's token in query / out */
    const int64_t *row_seq,       /* [num_rows]: the row's sequence (block table row) */
    const int64_t *row_kv_len,    /* [num_rows]: keys before and including the row's token */
    int64_t num_rows,
    const int64_t *item_row,      /* [num_items]: the row an item belongs to */
    const int64_t *item_begin,    /* [num_items]: its first key position */
    const int64_t *item_end,      /* [num_items]: one past its last key position */
    const int64_t *row_first_item,/* [num_rows + 1]: items of row r: [first[r], first[r+1]) */
    int64_t num_items,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
    float scale, int64_t sliding_window, /* <= 0: none */
    float *partial,               /* [num_items, num_heads, head_dim + 2] scratch */
    float *out,                   /* [num_tokens, num_heads, head_dim] */
    int64_t out_token_stride, int64_t out_head_stride,
    int num_threads) {
  const int64_t group = num_heads / num_kv_heads;
  if (num_heads > MAX_HEADS || head_dim > MAX_HEAD_DIM || block_size > MAX_BLOCK) return 1;
  const int64_t slot_stride = num_kv_heads * head_dim;
  const int64_t part_stride = head_dim + 2;

#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
  for (int64_t item = 0; item < num_items; ++item) {
    const int64_t row = item_row[item];
    int64_t begin = item_begin[item];
    const int64_t end = item_end[item];
    if (sliding_window > 0 && begin < row_kv_len[row] - sliding_window)
      begin = row_kv_len[row] - sliding_window;
    const float *q = query + row_query[row] * q_token_stride;
    const int32_t *table = block_tables + row_seq[row] * max_blocks_per_seq;

    /* One item streams whole blocks (all KV heads) in cache-line order. */
    /* Sized by the call (at most MAX_HEADS x MAX_HEAD_DIM): 4.6 KB for SmolLM2's heads. */
    float qs[num_heads][head_dim], acc[num_heads][head_dim];
    float m[num_heads], l[num_heads], s[block_size];
    for (int64_t h = 0; h < num_heads; ++h) {
      m[h] = -FLT_MAX;
      l[h] = 0.0f;
      for (int64_t d = 0; d < head_dim; ++d) {
        qs[h][d] = q[h * q_head_stride + d] * scale;
        acc[h][d] = 0.0f;
      }
    }
    for (int64_t pos = begin; pos < end;) {
      const int64_t offset = pos % block_size;
      int64_t n = block_size - offset;
      if (n > end - pos) n = end - pos;
      const int64_t slot = (int64_t)table[pos / block_size] * block_size + offset;
      if (pos + n < end) prefetch_block(key_cache, value_cache, table, pos + n, end, block_size,
                                        slot_stride);
      for (int64_t h = 0; h < num_heads; ++h) {
        const int64_t kv_head = h / group;
        const float *k = key_cache + slot * slot_stride + kv_head * head_dim;
        const float *v = value_cache + slot * slot_stride + kv_head * head_dim;
        for (int64_t j = 0; j < n; ++j) s[j] = dot(qs[h], k + j * slot_stride, head_dim);
        float block_max = -FLT_MAX;
        for (int64_t j = 0; j < n; ++j) block_max = s[j] > block_max ? s[j] : block_max;
        const float new_max = block_max > m[h] ? block_max : m[h];
        const float correction = expf(m[h] - new_max);
        float block_sum = 0.0f;
#pragma omp simd reduction(+ : block_sum)
        for (int64_t j = 0; j < n; ++j) {
          s[j] = exp_nonpositive(s[j] - new_max);
          block_sum += s[j];
        }
        l[h] = l[h] * correction + block_sum;
        float *restrict a = acc[h];
        for (int64_t d = 0; d < head_dim; ++d) a[d] *= correction;
        for (int64_t j = 0; j < n; ++j) {
          const float p = s[j];
          const float *restrict vj = v + j * slot_stride;
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * vj[d];
        }
        m[h] = new_max;
      }
      pos += n;
    }
    for (int64_t h = 0; h < num_heads; ++h) {
      float *part = partial + (item * num_heads + h) * part_stride;
      part[0] = m[h];
      part[1] = l[h];
      for (int64_t d = 0; d < head_dim; ++d) part[2 + d] = acc[h][d];
    }
  }

#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t work = 0; work < num_rows * num_heads; ++work) {
    const int64_t row = work / num_heads, head = work % num_heads;
    const int64_t first = row_first_item[row], last = row_first_item[row + 1];
    float max_all = -FLT_MAX;
    for (int64_t item = first; item < last; ++item) {
      const float *part = partial + (item * num_heads + head) * part_stride;
      if (part[1] > 0.0f && part[0] > max_all) max_all = part[0];
    }
    float *o = out + row_query[row] * out_token_stride + head * out_head_stride;
    float total = 0.0f;
    for (int64_t d = 0; d < head_dim; ++d) o[d] = 0.0f;
    for (int64_t item = first; item < last; ++item) {
      const float *part = partial + (item * num_heads + head) * part_stride;
      if (part[1] <= 0.0f) continue;
      const float weight = expf(part[0] - max_all);
      total += part[1] * weight;
      for (int64_t d = 0; d < head_dim; ++d) o[d] += part[2 + d] * weight;
    }
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int64_t d = 0; d < head_dim; ++d) o[d] *= inv;
  }
  return 0;
}
