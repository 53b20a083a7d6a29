/* Small-row float32 linear layers for x86-64 CPUs with AVX2 and FMA (built and loaded by cpu_gemm.py).

   y[M][N] = x[M][K] · Wᵀ + bias (+ residual), and the GLU  y[M][H] = (x·Wvᵀ + bv) · silu(x·Wgᵀ + bg).

   W is stored in panels of 16 output columns, each panel K rows of 16 floats (one 64-byte cache line
   per k): panel p holds W[16p .. 16p+15][0 .. K-1] transposed. A GLU weight stores its value and gate
   panels in pairs (value panel q, then gate panel q). Panels must be 32-byte aligned.

   Why a kernel of our own: at the few dozen rows of an LMDM denoising step, a linear reads each weight
   once for very little arithmetic, and oneDNN's kernels leave that weight stream to the hardware
   prefetcher, which falls far behind (a 49-row layer streaming its weights from memory ran 1.6x slower
   than with them in cache on the dev machine). Here each thread computes a panel while it prefetches the
   next one, spread over the panel's row tiles, so the weight stream overlaps the arithmetic.

   Micro-kernel: 6 rows x 16 columns (12 accumulators, 2 weight registers, 1 broadcast: 15 of the 16 ymm
   registers), the full K per tile, accumulating k = 0 .. K-1 in order with fused multiply-adds. The
   threads of torch's OpenMP pool split the panels; rows run in chunks of MC so a large M re-reads its
   weights per chunk rather than its inputs per panel, each chunk in tiles of at most 6 rows, as even as
   possible. A row's sum runs over k in order whatever its tile, so the split never changes a result. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define MR 6
#define NR 16
#define MC 252 /* rows per chunk (a multiple of MR) */

#define ACC(r) __m256 c##r##0 = _mm256_setzero_ps(), c##r##1 = _mm256_setzero_ps();
#define FMA(r)                                                       \
  {                                                                  \
    __m256 b = _mm256_broadcast_ss(x + (r) * (ptrdiff_t)K + k);     \
    c##r##0 = _mm256_fmadd_ps(b, w0, c##r##0);                       \
    c##r##1 = _mm256_fmadd_ps(b, w1, c##r##1);                       \
  }
enum { EPI_STORE = 0, EPI_ADD = 1, EPI_GLU = 2 };

/* silu(g) = g / (1 + exp(-g)); exp by Cody-Waite range reduction and a degree-5 polynomial (Cephes expf,
   about 1 ulp), saturating to 0 and inf outside float's range. */
static inline __m256 exp_ps(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

static inline __m256 silu_ps(__m256 g) {
  __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g));
  return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

/* One epilogue row: out = acc + bias, then + res (ADD) or · (in GLU: out holds value + bv already). */
static inline void finish(__m256 a0, __m256 a1, __m256 b0, __m256 b1, float *out, const float *res, int epi) {
  a0 = _mm256_add_ps(a0, b0);
  a1 = _mm256_add_ps(a1, b1);
  if (epi == EPI_ADD) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(res));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(res + 8));
  } else if (epi == EPI_GLU) {
    a0 = _mm256_mul_ps(_mm256_loadu_ps(out), silu_ps(a0));
    a1 = _mm256_mul_ps(_mm256_loadu_ps(out + 8), silu_ps(a1));
  }
  _mm256_storeu_ps(out, a0);
  _mm256_storeu_ps(out + 8, a1);
}

#define FIN(r) finish(c##r##0, c##r##1, b0, b1, y + (r) * (ptrdiff_t)ldy, res ? res + (r) * (ptrdiff_t)ldy : 0, epi);

#define ROWS1(M) M(0)
#define ROWS2(M) ROWS1(M) M(1)
#define ROWS3(M) ROWS2(M) M(2)
#define ROWS4(M) ROWS3(M) M(3)
#define ROWS5(M) ROWS4(M) M(4)
#define ROWS6(M) ROWS5(M) M(5)

/* R rows of x (row stride K) times one panel w, into y (row stride ldy), with the epilogue `epi`. Prefetches
   `npf` cache lines of the next panel from `pf`, one per k. One function per R (a partial last tile costs
   its own rows only). */
#define TILE(R)                                                                                                   \
  static void tile##R(const float *restrict x, int K, const float *restrict w, float *y, int ldy, const float *res, \
                      const float *bias, int epi, const float *pf, int npf) {                                     \
    ROWS##R(ACC) int k = 0;                                                                                       \
    for (; k < npf; k++) {                                                                                        \
      _mm_prefetch((const char *)(pf + (ptrdiff_t)k * NR), _MM_HINT_T0);                                          \
      __m256 w0 = _mm256_load_ps(w + k * NR), w1 = _mm256_load_ps(w + k * NR + 8);                               \
      ROWS##R(FMA)                                                                                                \
    }                                                                                                             \
    for (; k < K; k++) {                                                                                          \
      __m256 w0 = _mm256_load_ps(w + k * NR), w1 = _mm256_load_ps(w + k * NR + 8);                               \
      ROWS##R(FMA)                                                                                                \
    }                                                                                                             \
    __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();                                               \
    __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();                                           \
    ROWS##R(FIN)                                                                                                  \
  }
TILE(1)
TILE(2)
TILE(3)
TILE(4)
TILE(5)
TILE(6)

typedef void (*tile_fn)(const float *, int, const float *, float *, int, const float *, const float *, int, const float *, int);
static const tile_fn TILES[MR + 1] = {0, tile1, tile2, tile3, tile4, tile5, tile6};

/* Shared driver. units: panels (linear) or panel pairs (GLU); each unit covers 16 output columns. */
static void run(const float *x, int M, int K, const float *wp, int units, int glu, const float *bias, const float *res,
                float *y, int ldy, int threads) {
  const ptrdiff_t unit_floats = (ptrdiff_t)K * NR * (glu ? 2 : 1);
#pragma omp parallel num_threads(threads)
  {
    int nt = omp_get_num_threads(), id = omp_get_thread_num();
    int u0 = (int)((long)units * id / nt), u1 = (int)((long)units * (id + 1) / nt);
    for (int c0 = 0; c0 < M; c0 += MC) {
      int rows_c = M - c0 < MC ? M - c0 : MC;
      /* The chunk's rows split as evenly as the tile count allows (49 = 4·6 + 5·5, not 8·6 + 1): a tile's k
         loop takes about max(rows, FMA latency) cycles per k, so a one-row tile costs two thirds of a full one
         (measured: 1-4% off the 49- and 97-row passes of the bench model's linears). */
      int tiles = (rows_c + MR - 1) / MR, base = rows_c / tiles, extra = rows_c % tiles, calls = tiles * (glu ? 2 : 1);
      int lines = K * (glu ? 2 : 1), per = (lines + calls - 1) / calls; /* next unit's lines per tile call */
      for (int u = u0; u < u1; u++) {
        const float *w = wp + u * unit_floats;
        const float *next = u + 1 < u1 ? w + unit_floats : (c0 + MC < M && u0 < u1 ? wp + u0 * unit_floats : 0);
        int call = 0;
        for (int t = 0; t < tiles; t++) {
          int r = c0 + t * base + (t < extra ? t : extra), rows = base + (t < extra);
          const float *xt = x + (ptrdiff_t)r * K;
          for (int half = 0; half < (glu ? 2 : 1); half++, call++) {
            int lo = call * per, npf = next && lo < lines ? (lo + per <= lines ? per : lines - lo) : 0;
            const float *b = bias ? bias + (glu ? (ptrdiff_t)half * units * NR : 0) + (ptrdiff_t)u * NR : 0;
            int epi = glu ? (half ? EPI_GLU : EPI_STORE) : (res ? EPI_ADD : EPI_STORE);
            TILES[rows](xt, K, w + half * (ptrdiff_t)K * NR, y + (ptrdiff_t)r * ldy + (ptrdiff_t)u * NR, ldy,
                        res ? res + (ptrdiff_t)r * ldy + (ptrdiff_t)u * NR : 0, b, epi, next ? next + (ptrdiff_t)lo * NR : 0, npf);
          }
        }
      }
    }
  }
}

/* y = x·Wᵀ + bias (+ res). x (M, K), wp (N/16 panels), bias (N) or NULL, res (M, N) or NULL, y (M, N). */
void lmdm_linear(const float *x, int M, int K, const float *wp, int N, const float *bias, const float *res, float *y,
                 int threads) {
  run(x, M, K, wp, N / NR, 0, bias, res, y, N, threads);
}

/* y = (x·Wvᵀ + bv) · silu(x·Wgᵀ + bg). wp: H/16 (value, gate) panel pairs; bias (2H: value then gate) or
   NULL; y (M, H). */
void lmdm_glu(const float *x, int M, int K, const float *wp, int H, const float *bias, float *y, int threads) {
  run(x, M, K, wp, H / NR, 1, bias, 0, y, H, threads);
}

/* Partial rotary of the queries and keys of a fused qkv projection, rotate-half convention: qkv (B, S, 3, H, Dh)
   contiguous, cos/sin (S, R/2) contiguous, out (2, B, H, S, Dh) contiguous (q then k, heads split). For the
   halves x1, x2 of the first R dims of a head: (x1·cos − x2·sin, x2·cos + x1·sin), each product rounded
   before the sum (no fused multiply-add: FLAGS has -ffp-contract=off), which is what torch's
   mul / mul / sub ops compute, so the result is bit-identical to lmdm.models.rotary.apply_rotary; the
   other Dh − R dims are copied. One thread: a pass's queries and keys are a few hundred KB. */
void lmdm_rotary_qk(const float *qkv, int B, int S, int H, int Dh, const float *cos, const float *sin, int half,
                    float *out) {
  const ptrdiff_t D = (ptrdiff_t)H * Dh;
  for (int j = 0; j < 2; j++)
    for (int b = 0; b < B; b++)
      for (int h = 0; h < H; h++)
        for (int s = 0; s < S; s++) {
          const float *x = qkv + ((ptrdiff_t)b * S + s) * 3 * D + j * D + (ptrdiff_t)h * Dh;
          float *o = out + ((((ptrdiff_t)j * B + b) * H + h) * S + s) * Dh;
          const float *c = cos + (ptrdiff_t)s * half, *n = sin + (ptrdiff_t)s * half;
          int d = 0;
          for (; d + 8 <= half; d += 8) {
            __m256 x1 = _mm256_loadu_ps(x + d), x2 = _mm256_loadu_ps(x + half + d);
            __m256 cv = _mm256_loadu_ps(c + d), sv = _mm256_loadu_ps(n + d);
            _mm256_storeu_ps(o + d, _mm256_sub_ps(_mm256_mul_ps(x1, cv), _mm256_mul_ps(x2, sv)));
            _mm256_storeu_ps(o + half + d, _mm256_add_ps(_mm256_mul_ps(x2, cv), _mm256_mul_ps(x1, sv)));
          }
          for (; d < half; d++) {
            float x1 = x[d], x2 = x[half + d], a = x1 * c[d], bb = x2 * n[d], e = x2 * c[d], f = x1 * n[d];
            o[d] = a - bb;
            o[half + d] = e + f;
          }
          for (d = 2 * half; d < Dh; d++) o[d] = x[d];
        }
}

/* Panels from a row-major weight (N, K): wp[p][k][j] = w[16p + j][k]; `pairs` (GLU): w is (2H, K) and the
   value panel q and gate panel q are stored together. */
void lmdm_pack(const float *w, int N, int K, int pairs, float *wp) {
  int units = pairs ? N / 2 / NR : N / NR, halves = pairs ? 2 : 1;
  for (int u = 0; u < units; u++)
    for (int h = 0; h < halves; h++) {
      float *dst = wp + ((ptrdiff_t)u * halves + h) * K * NR;
      const float *src = w + ((ptrdiff_t)h * (N / 2) * pairs + (ptrdiff_t)u * NR) * K;
      for (int k = 0; k < K; k++)
        for (int j = 0; j < NR; j++) dst[(ptrdiff_t)k * NR + j] = src[(ptrdiff_t)j * K + k];
    }
}
