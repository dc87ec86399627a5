/* Paged attention of short query runs over K/V read in place from the paged cache (float32).
 *
 * Built and loaded by kernels/cpu_native.py (gcc -O3 -march=native -fopenmp, via ctypes).
 * A "run" is 1..MAX_RUN consecutive query tokens of one sequence (a decode step's token, or a
 * speculative step's token and its drafts). Token t of a run of length R whose sequence holds
 * kv_len keys attends, causally, to keys [lo, kv_len - (R - 1 - t)) where lo is 0 or, with a
 * sliding window, the window's start. The keys of a run are cut into "items" of consecutive
 * positions so that a few long runs still spread over all threads (split-K, as in
 * flash-decoding); pass 1 runs one item per iteration, streaming its blocks (all heads) with an
 * online softmax per (token, query head), and writes a partial (max, sum, weighted values);
 * pass 2 merges a token's partials. Every key and value of a run is read from memory once for
 * all its tokens (they and the query heads of a GQA group meet each KV vector while it is in
 * L1): a run of 4 tokens costs little more than one token, which is what makes speculative
 * decoding pay on a memory-bound CPU.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

#define MAX_HEADS 64    /* query heads */
#define MAX_HEAD_DIM 256
#define MAX_BLOCK 128   /* block_size */
#define MAX_RUN 8       /* tokens of one run */

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
    const int64_t *run_query,     /* [num_runs]: the run's first token in query / out */
    const int64_t *run_len,       /* [num_runs]: its tokens, 1..MAX_RUN */
    const int64_t *run_seq,       /* [num_runs]: its sequence (block table row) */
    const int64_t *run_kv_len,    /* [num_runs]: keys its last token sees (itself included) */
    int64_t num_runs,
    const int64_t *item_run,      /* [num_items]: the run an item belongs to */
    const int64_t *item_begin,    /* [num_items]: its first key position */
    const int64_t *item_end,      /* [num_items]: one past its last key position */
    const int64_t *run_first_item,/* [num_runs + 1]: items of run r: [first[r], first[r+1]) */
    int64_t num_items,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
    float scale, int64_t sliding_window, /* <= 0: none */
    float *partial,               /* [num_items, MAX_RUN, num_heads, head_dim + 2] scratch */
    float *out,                   /* [num_tokens, num_heads, head_dim] */
    int64_t out_token_stride, int64_t out_head_stride,
    int num_threads) {
  const int64_t group = num_heads / num_kv_heads;
  if (num_heads > MAX_HEADS || head_dim > MAX_HEAD_DIM || block_size > MAX_BLOCK) return 1;
  for (int64_t run = 0; run < num_runs; ++run)
    if (run_len[run] < 1 || run_len[run] > MAX_RUN || run_kv_len[run] < run_len[run]) return 2;
  const int64_t slot_stride = num_kv_heads * head_dim;
  const int64_t part_stride = head_dim + 2;

#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
  for (int64_t item = 0; item < num_items; ++item) {
    const int64_t run = item_run[item];
    const int64_t num_tok = run_len[run];
    const int64_t kv_len = run_kv_len[run];
    const int32_t *table = block_tables + run_seq[run] * max_blocks_per_seq;
    /* Token t sees keys [lo[t], hi[t]) of this item (empty when lo >= hi). */
    int64_t lo[MAX_RUN], hi[MAX_RUN];
    int64_t begin = item_end[item], end = item_begin[item];
    for (int64_t t = 0; t < num_tok; ++t) {
      hi[t] = kv_len - (num_tok - 1 - t);
      lo[t] = sliding_window > 0 && hi[t] - sliding_window > 0 ? hi[t] - sliding_window : 0;
      if (lo[t] < item_begin[item]) lo[t] = item_begin[item];
      if (hi[t] > item_end[item]) hi[t] = item_end[item];
      if (lo[t] < hi[t]) {
        begin = lo[t] < begin ? lo[t] : begin;
        end = hi[t] > end ? hi[t] : end;
      }
    }

    /* Sized by the call (at most MAX_RUN x MAX_HEADS x MAX_HEAD_DIM): 37 KB for 4 tokens of
     * SmolLM2's heads. */
    float qs[num_tok][num_heads][head_dim], acc[num_tok][num_heads][head_dim];
    float m[num_tok][num_heads], l[num_tok][num_heads], s[block_size];
    for (int64_t t = 0; t < num_tok; ++t) {
      const float *q = query + (run_query[run] + t) * q_token_stride;
      for (int64_t h = 0; h < num_heads; ++h) {
        m[t][h] = -FLT_MAX;
        l[t][h] = 0.0f;
        for (int64_t d = 0; d < head_dim; ++d) {
          qs[t][h][d] = q[h * q_head_stride + d] * scale;
          acc[t][h][d] = 0.0f;
        }
      }
    }
    /* One item streams whole blocks (all KV heads) in cache-line order. */
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
        for (int64_t t = 0; t < num_tok; ++t) {
          /* keys j in [j0, j1) of this block are visible to token t */
          const int64_t j0 = lo[t] > pos ? lo[t] - pos : 0;
          const int64_t j1 = hi[t] < pos + n ? hi[t] - pos : n;
          if (j0 >= j1) continue;
          for (int64_t j = j0; j < j1; ++j) s[j] = dot(qs[t][h], k + j * slot_stride, head_dim);
          float block_max = -FLT_MAX;
          for (int64_t j = j0; j < j1; ++j) block_max = s[j] > block_max ? s[j] : block_max;
          const float new_max = block_max > m[t][h] ? block_max : m[t][h];
          const float correction = expf(m[t][h] - new_max);
          float block_sum = 0.0f;
#pragma omp simd reduction(+ : block_sum)
          for (int64_t j = j0; j < j1; ++j) {
            s[j] = exp_nonpositive(s[j] - new_max);
            block_sum += s[j];
          }
          l[t][h] = l[t][h] * correction + block_sum;
          float *restrict a = acc[t][h];
          for (int64_t d = 0; d < head_dim; ++d) a[d] *= correction;
          for (int64_t j = j0; j < j1; ++j) {
            const float p = s[j];
            const float *restrict vj = v + j * slot_stride;
            for (int64_t d = 0; d < head_dim; ++d) a[d] += p * vj[d];
          }
          m[t][h] = new_max;
        }
      }
      pos += n;
    }
    for (int64_t t = 0; t < num_tok; ++t) {
      for (int64_t h = 0; h < num_heads; ++h) {
        float *part = partial + ((item * MAX_RUN + t) * num_heads + h) * part_stride;
        part[0] = m[t][h];
        part[1] = l[t][h];
        for (int64_t d = 0; d < head_dim; ++d) part[2 + d] = acc[t][h][d];
      }
    }
  }

#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t work = 0; work < num_runs * MAX_RUN * num_heads; ++work) {
    const int64_t run = work / (MAX_RUN * num_heads);
    const int64_t t = work / num_heads % MAX_RUN, head = work % num_heads;
    if (t >= run_len[run]) continue;
    const int64_t first = run_first_item[run], last = run_first_item[run + 1];
    float max_all = -FLT_MAX;
    for (int64_t item = first; item < last; ++item) {
      const float *part = partial + ((item * MAX_RUN + t) * num_heads + head) * part_stride;
      if (part[1] > 0.0f && part[0] > max_all) max_all = part[0];
    }
    float *o = out + (run_query[run] + t) * out_token_stride + head * out_head_stride;
    float total = 0.0f;
    for (int64_t d = 0; d < head_dim; ++d) o[d] = 0.0f;
    for (int64_t item = first; item < last; ++item) {
      const float *part = partial + ((item * MAX_RUN + t) * num_heads + head) * part_stride;
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
