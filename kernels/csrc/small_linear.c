/* y = x @ w^T (+ bias) for a few rows of x: nn.Linear in a decode step (float32).
 *
 * Built and loaded by kernels/cpu_linear.py (see kernels/native_build.py for the flags).
 * With few rows a linear layer is bound by reading its weight, and BLAS's general matrix
 * product spends more on re-packing that weight in every call than on the arithmetic
 * (SmolLM2's shapes on 2 cores: 8 rows cost 3x one row). Here the output features are split
 * over the threads in groups of four weight rows; each group is read from memory once and
 * meets every row of x (which stays in L1/L2) while it is in cache. Four rows of x times four
 * weight rows make 16 sums from 8 loads per step of k.
 */
#include <stdint.h>

/* out[r * 4 + c] = dot(x row r, w row c) for r, c < 4 */
static inline void dots_4x4(const float *restrict x, int64_t x_stride,
                            const float *restrict w, int64_t k, float *restrict out) {
  const float *restrict x0 = x, *restrict x1 = x + x_stride;
  const float *restrict x2 = x + 2 * x_stride, *restrict x3 = x + 3 * x_stride;
  const float *restrict w0 = w, *restrict w1 = w + k, *restrict w2 = w + 2 * k,
                        *restrict w3 = w + 3 * k;
  float s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
  float s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, \
                               s30, s31, s32, s33)
  for (int64_t i = 0; i < k; ++i) {
    const float a0 = x0[i], a1 = x1[i], a2 = x2[i], a3 = x3[i];
    const float b0 = w0[i], b1 = w1[i], b2 = w2[i], b3 = w3[i];
    s00 += a0 * b0; s01 += a0 * b1; s02 += a0 * b2; s03 += a0 * b3;
    s10 += a1 * b0; s11 += a1 * b1; s12 += a1 * b2; s13 += a1 * b3;
    s20 += a2 * b0; s21 += a2 * b1; s22 += a2 * b2; s23 += a2 * b3;
    s30 += a3 * b0; s31 += a3 * b1; s32 += a3 * b2; s33 += a3 * b3;
  }
  out[0] = s00; out[1] = s01; out[2] = s02; out[3] = s03;
  out[4] = s10; out[5] = s11; out[6] = s12; out[7] = s13;
  out[8] = s20; out[9] = s21; out[10] = s22; out[11] = s23;
  out[12] = s30; out[13] = s31; out[14] = s32; out[15] = s33;
}

/* out[c] = dot(x, w row c) for c < 4 */
static inline void dots_1x4(const float *restrict x, const float *restrict w, int64_t k,
                            float *restrict out) {
  const float *restrict w0 = w, *restrict w1 = w + k, *restrict w2 = w + 2 * k,
                        *restrict w3 = w + 3 * k;
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < k; ++i) {
    const float a = x[i];
    s0 += a * w0[i]; s1 += a * w1[i]; s2 += a * w2[i]; s3 += a * w3[i];
  }
  out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

static inline float dot(const float *restrict x, const float *restrict w, int64_t k) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < k; ++i) s += x[i] * w[i];
  return s;
}

int tarry_small_linear_f32(
    const float *x,     /* [m, k], rows x_stride floats apart, k contiguous */
    int64_t x_stride,
    const float *w,     /* [n, k] contiguous (nn.Linear's weight) */
    const float *bias,  /* [n], or NULL */
    float *y,           /* [m, n] contiguous */
    int64_t m, int64_t n, int64_t k, int num_threads) {
  if (m <= 0 || n <= 0 || k <= 0 || x_stride < k) return 1;
  const int64_t groups = (n + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t col = 4 * g;
    const float *wg = w + col * k;
    float sums[16];
    if (col + 4 > n) { /* the last, partial group: one dot at a time */
      for (int64_t c = col; c < n; ++c)
        for (int64_t r = 0; r < m; ++r) {
          const float s = dot(x + r * x_stride, w + c * k, k);
          y[r * n + c] = bias ? s + bias[c] : s;
        }
      continue;
    }
    int64_t row = 0;
    for (; row + 4 <= m; row += 4) {
      dots_4x4(x + row * x_stride, x_stride, wg, k, sums);
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c)
          y[(row + r) * n + col + c] = bias ? sums[4 * r + c] + bias[col + c] : sums[4 * r + c];
    }
    for (; row < m; ++row) {
      dots_1x4(x + row * x_stride, wg, k, sums);
      for (int c = 0; c < 4; ++c)
        y[row * n + col + c] = bias ? sums[c] + bias[col + c] : sums[c];
    }
  }
  return 0;
}
