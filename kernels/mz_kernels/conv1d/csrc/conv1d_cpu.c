/* Depthwise causal conv1d on channel-last [B, L, D] float32, forward and backward (mz_kernels cpu backend).
 *
 * y[b,t,d] = act(bias[d] + sum_k w[k,d] * xp[b, t+k, d]),  xp = (initial_state or zeros) ++ x (length W-1+L);
 * the weight is passed transposed, [W, D], so every inner loop runs over contiguous channels in
 * vectors of VW floats (mz_simd.h; its exp gives a vectorised SiLU).
 * Work units are (batch row, block of T_BLOCK steps). Reductions over batch and time (dweight,
 * dbias) go through per-unit partial buffers summed in a fixed order by the caller, so results do
 * not depend on the thread count.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "mz_simd.h"

#define T_BLOCK 256

int mz_conv1d_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int64_t mz_conv1d_units(int64_t B, int64_t L) { return B * ((L + T_BLOCK - 1) / T_BLOCK); }

/* Row of padded position p of batch b: x row, or the initial state gathered into `tmp` (or NULL = zeros). */
static const float *xp_row(const float *x, const float *init, float *tmp, int64_t b, int64_t p, int64_t L, int64_t D,
                           int64_t W) {
    if (p >= W - 1) return x + (b * L + (p - (W - 1))) * D;
    if (!init) return NULL;
    for (int64_t d = 0; d < D; ++d) tmp[d] = init[(b * D + d) * (W - 1) + p];
    return tmp;
}

/* o[d] += w[d] * r[d] over D channels */
static inline void axpy(float *o, const float *w, const float *r, int64_t D) {
    int64_t d = 0;
    for (; d + VW <= D; d += VW) vst(o + d, vld(o + d) + vld(w + d) * vld(r + d));
    for (; d < D; ++d) o[d] += w[d] * r[d];
}

/* Pre-activation of steps [t0, t1) of row b into pre[(t - t0) * D + d]; tmp: D floats of scratch. */
static void pre_block(const float *x, const float *w, const float *bias, const float *init, float *pre, float *tmp,
                      int64_t b, int64_t t0, int64_t t1, int64_t L, int64_t D, int64_t W) {
    for (int64_t t = t0; t < t1; ++t) {
        float *o = pre + (t - t0) * D;
        if (bias) memcpy(o, bias, sizeof(float) * (size_t)D);
        else memset(o, 0, sizeof(float) * (size_t)D);
        for (int64_t k = 0; k < W; ++k) {
            const float *r = xp_row(x, init, tmp, b, t + k, L, D, W);
            if (r) axpy(o, w + k * D, r, D);
        }
    }
}

static void silu_inplace(float *v, int64_t n) {
    int64_t i = 0;
    for (; i + VW <= n; i += VW) {
        vf z = vld(v + i);
        vst(v + i, z * vsilu_sig(z));
    }
    for (; i < n; ++i) {
        vf z = vld_part(v + i, 1);
        vst_part(v + i, z * vsilu_sig(z), 1);
    }
}

/* g <- g * silu'(pre) = g * s (1 + pre (1 - s)), s = sigmoid(pre); in place on pre (which becomes dpre) */
static void dsilu_inplace(float *pre, const float *g, int64_t n) {
    int64_t i = 0;
    for (; i < n; i += VW) {
        int64_t m = n - i < VW ? n - i : VW;
        vf z = vld_part(pre + i, m), s = vsilu_sig(z);
        vst_part(pre + i, vld_part(g + i, m) * s * (1.0f + z * (1.0f - s)), m);
    }
}

/* Forward over units [u0, u1): y [B, L, D], final [B, D, W-1] (written by the unit owning t = L-1). */
int mz_conv1d_fwd(const float *x, const float *w, const float *bias, const float *init, float *y, float *final,
                  int64_t B, int64_t L, int64_t D, int64_t W, int act, int64_t u0, int64_t u1, int nthreads) {
    int64_t nt = (L + T_BLOCK - 1) / T_BLOCK;
    int fail = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1) reduction(| : fail)
    for (int64_t u = u0; u < u1; ++u) {
        int64_t b = u / nt, t0 = (u % nt) * T_BLOCK, t1 = t0 + T_BLOCK < L ? t0 + T_BLOCK : L;
        float *tmp = (float *)malloc(sizeof(float) * (size_t)D);
        if (!tmp) { fail = 1; continue; }
        float *out = y + (b * L + t0) * D;
        pre_block(x, w, bias, init, out, tmp, b, t0, t1, L, D, W);
        if (act) silu_inplace(out, (t1 - t0) * D);
        if (t1 == L)
            for (int64_t i = 0; i < W - 1; ++i) {
                int64_t p = L + i; /* padded position of final-state slot i */
                for (int64_t d = 0; d < D; ++d)
                    final[(b * D + d) * (W - 1) + i] = p >= W - 1 ? x[(b * L + (p - (W - 1))) * D + d]
                                                       : (init ? init[(b * D + d) * (W - 1) + p] : 0.0f);
            }
        free(tmp);
    }
    return fail;
}

/* Backward over units [u0, u1).
 * dx [B, L, D]; dinit [B, D, W-1] or NULL; per-unit partial dweight [U, W, D] and dbias [U, D].
 * dxp[p] = sum_k dpre[p - k] * w[k] (0 <= p - k < L) + (p >= L ? dfinal[p - L] : 0). */
int mz_conv1d_bwd(const float *dy, const float *dfinal, const float *x, const float *w, const float *bias,
                  const float *init, float *dx, float *dinit, float *dw_part, float *db_part, int64_t B, int64_t L,
                  int64_t D, int64_t W, int act, int64_t u0, int64_t u1, int nthreads) {
    int64_t nt = (L + T_BLOCK - 1) / T_BLOCK;
    int fail = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1) reduction(| : fail)
    for (int64_t u = u0; u < u1; ++u) {
        int64_t b = u / nt, t0 = (u % nt) * T_BLOCK, t1 = t0 + T_BLOCK < L ? t0 + T_BLOCK : L;
        /* dpre of outputs [t0, e1): every output that reads an input of this block (or the initial state) */
        int64_t e1 = t1 + W - 1 < L ? t1 + W - 1 : L;
        float *dpre = (float *)malloc(sizeof(float) * (size_t)((e1 - t0) * D + D));
        if (!dpre) { fail = 1; continue; }
        float *tmp = dpre + (e1 - t0) * D;
        if (act) {
            pre_block(x, w, bias, init, dpre, tmp, b, t0, e1, L, D, W);
            dsilu_inplace(dpre, dy + (b * L + t0) * D, (e1 - t0) * D);
        } else {
            memcpy(dpre, dy + (b * L + t0) * D, sizeof(float) * (size_t)((e1 - t0) * D));
        }
        /* this unit's dweight/dbias: outputs t in [t0, t1) only (each output counted once) */
        float *dwp = dw_part + u * W * D, *dbp = db_part + u * D;
        memset(dwp, 0, sizeof(float) * (size_t)(W * D));
        memset(dbp, 0, sizeof(float) * (size_t)D);
        for (int64_t t = t0; t < t1; ++t) {
            const float *g = dpre + (t - t0) * D;
            for (int64_t d = 0; d < D; ++d) dbp[d] += g[d];
            for (int64_t k = 0; k < W; ++k) {
                const float *r = xp_row(x, init, tmp, b, t + k, L, D, W);
                if (r) axpy(dwp + k * D, g, r, D);
            }
        }
        /* dx for x positions j in [t0, t1): padded p = j + W - 1 reads outputs t = p - k (t >= j >= t0, t < e1) */
        for (int64_t j = t0; j < t1; ++j) {
            int64_t p = j + W - 1;
            float *o = dx + (b * L + j) * D;
            memset(o, 0, sizeof(float) * (size_t)D);
            for (int64_t k = 0; k < W; ++k) {
                int64_t t = p - k;
                if (t < e1) axpy(o, w + k * D, dpre + (t - t0) * D, D);
            }
            if (p >= L)
                for (int64_t d = 0; d < D; ++d) o[d] += dfinal[(b * D + d) * (W - 1) + (p - L)];
        }
        /* dinit: padded p < W-1 reads outputs t = p - k in [0, min(L, W-1)), all inside the row's first unit */
        if (dinit && t0 == 0)
            for (int64_t p = 0; p < W - 1; ++p)
                for (int64_t d = 0; d < D; ++d) {
                    float acc = 0.0f;
                    for (int64_t k = 0; k < W; ++k) {
                        int64_t t = p - k;
                        if (t >= 0 && t < e1) acc += dpre[t * D + d] * w[k * D + d];
                    }
                    if (p >= L) acc += dfinal[(b * D + d) * (W - 1) + (p - L)];
                    dinit[(b * D + d) * (W - 1) + p] = acc;
                }
        free(dpre);
    }
    return fail;
}
