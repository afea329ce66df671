/* Fused CPU selective scan (Mamba-1 S6): forward and backward, float32, channel-last.
 *
 * Layouts (all contiguous, float32):
 *   u, delta, z, y, grads of them   [B, L, D]
 *   Bm, Cm                          [B, L, G, N]   channel d reads group d / (D / G)
 *   At                              [N, D]         A transposed, so channels are contiguous
 *   Dv, bias                        [D]
 *   h0, hT, dh0                     [B, D, N]
 *   saved                           [B, n_ckpt, D, N]  state before steps 0, CK, 2 CK, ...
 *
 * Channels are cut into blocks (group g, block j of the group: a block never crosses a group, so
 * B_t[g, n] and C_t[g, n] are scalars for the whole block). A work unit is (batch row b, a run of
 * consecutive blocks): it keeps its blocks' states as [N][P] floats each (P = block width rounded
 * up to VW lanes, padding lanes stay exactly zero) and walks t = 0..L-1, so [B, L, D, N] is never
 * built. Several blocks per unit make small-N rows (VMamba, N = 1) read long contiguous segments.
 * The arithmetic runs on GCC/Clang vector types of VW floats (one register: 16 with AVX-512, 8 with
 * AVX, else 4) across channels, so N = 1 vectorises as well as N = 16. Units are independent and
 * every reduction runs in a fixed order, so results do not depend on the number of threads or on
 * scheduling (bit-reproducible for a given build).
 *
 * Build: plain C11 with GNU vector extensions, e.g. cc -O3 -march=native -fopenmp -fno-math-errno
 * -ffp-contract=fast (OpenMP optional); see mz_kernels/_cbuild.py.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "mz_simd.h"

#define CK 64 /* checkpoint spacing; must equal CKPT in selective_scan/_common.py */
#define PF 8  /* prefetch the [B, L, D] rows this many steps ahead (strided rows defeat the HW prefetcher) */

/* ---------------------------------------------------------------- problem description */

typedef struct {
    int64_t Bsz, L, D, N, G;
    int64_t Dg;   /* channels per group */
    int64_t bw;   /* channels per block (the last block of a group may be narrower) */
    int64_t nbpg; /* blocks per group */
    int64_t bpu;  /* blocks per unit (consecutive blocks of one batch row, possibly several groups) */
    int64_t upb;  /* units per batch row */
    int64_t P;    /* padded block width: bw rounded up to VW */
    int64_t NP;   /* floats of one block's state: N * P */
    int64_t nck;  /* number of checkpoints */
    int softplus;
} dims_t;

typedef struct {
    int64_t g, j, d0, nb; /* group, block within the group, first channel, channels */
} block_t;

static block_t block_of(const dims_t *s, int64_t q)
{
    block_t k;
    k.g = q / s->nbpg;
    k.j = q % s->nbpg;
    k.d0 = k.g * s->Dg + k.j * s->bw;
    k.nb = s->Dg - k.j * s->bw < s->bw ? s->Dg - k.j * s->bw : s->bw;
    return k;
}

static void unit_of(const dims_t *s, int64_t k, int64_t *b, int64_t *q0, int64_t *nq)
{
    const int64_t nblk = s->G * s->nbpg;
    *b = k / s->upb;
    *q0 = (k % s->upb) * s->bpu;
    *nq = nblk - *q0 < s->bpu ? nblk - *q0 : s->bpu;
}

static float *alloc_floats(int64_t n)
{
    size_t bytes = ((size_t)n * sizeof(float) + 63) & ~(size_t)63;
    float *p = aligned_alloc(64, bytes ? bytes : 64);
    if (p) memset(p, 0, bytes);
    return p;
}

/* dt from delta + bias: softplus (and its derivative sigmoid into *sig) or the identity. */
VINL vf vdt(vf x, int softplus, vf *sig)
{
    if (!softplus) return x;
    vf e = vexp(-vabs(x));
    if (sig) *sig = vsigmoid(x, e);
    return vsoftplus(x, e);
}


/* Prefetch a row segment of n floats (one line per 16 floats), for reading or for writing. */
static inline void prefetch_row(const float *p, int64_t n)
{
    for (int64_t d = 0; d < n; d += 16) __builtin_prefetch(p + d);
}

static inline void prefetch_row_w(float *p, int64_t n)
{
    for (int64_t d = 0; d < n; d += 16) __builtin_prefetch(p + d, 1);
}

/* Copy a block's state between the unit layout [N][P] and the global layout [.., D, N]. */
static void state_in(float *h, const float *src, int64_t N, int64_t P, int64_t nb)
{
    for (int64_t d = 0; d < nb; ++d)
        for (int64_t n = 0; n < N; ++n) h[n * P + d] = src[d * N + n];
}

static void state_out(float *dst, const float *h, int64_t N, int64_t P, int64_t nb)
{
    for (int64_t d = 0; d < nb; ++d)
        for (int64_t n = 0; n < N; ++n) dst[d * N + n] = h[n * P + d];
}

/* Per-channel constants of a unit's blocks (block i at Al + i NP, Dl/bl + i P); padding lanes 0. */
static void unit_consts(const dims_t *s, int64_t q0, int64_t nq, const float *At, const float *Dv,
                        const float *bias, float *Al, float *Dl, float *bl)
{
    for (int64_t i = 0; i < nq; ++i) {
        const block_t k = block_of(s, q0 + i);
        for (int64_t n = 0; n < s->N; ++n)
            for (int64_t d = 0; d < k.nb; ++d) Al[i * s->NP + n * s->P + d] = At[n * s->D + k.d0 + d];
        for (int64_t d = 0; d < k.nb; ++d) {
            if (Dv) Dl[i * s->P + d] = Dv[k.d0 + d];
            if (bias) bl[i * s->P + d] = bias[k.d0 + d];
        }
    }
}

/* First channel and channel count of the row segment a unit covers. */
static void unit_span(const dims_t *s, int64_t q0, int64_t nq, int64_t *d0, int64_t *len)
{
    const block_t a = block_of(s, q0), z = block_of(s, q0 + nq - 1);
    *d0 = a.d0;
    *len = z.d0 + z.nb - a.d0;
}

/* ---------------------------------------------------------------- forward */

typedef struct {
    const float *u, *delta, *At, *Bm, *Cm, *Dv, *z, *bias, *h0;
    float *y, *hT, *saved;
} fwd_args;

static int64_t fwd_buf_floats(const dims_t *s) { return s->bpu * (2 * s->NP + 2 * s->P); }

static void fwd_unit(const dims_t *s, const fwd_args *a, int64_t k, float *buf)
{
    const int64_t N = s->N, P = s->P, NP = s->NP, L = s->L, D = s->D, G = s->G;
    int64_t b, q0, nq, span0, span;
    unit_of(s, k, &b, &q0, &nq);
    unit_span(s, q0, nq, &span0, &span);
    float *h = buf, *Al = h + s->bpu * NP, *Dl = Al + s->bpu * NP, *bl = Dl + s->bpu * P;
    memset(buf, 0, (size_t)fwd_buf_floats(s) * sizeof(float));
    unit_consts(s, q0, nq, a->At, a->Dv, a->bias, Al, Dl, bl);
    for (int64_t i = 0; i < nq; ++i) {
        const block_t blk = block_of(s, q0 + i);
        if (a->h0) state_in(h + i * NP, a->h0 + (b * D + blk.d0) * N, N, P, blk.nb);
    }

    for (int64_t t = 0; t < L; ++t) {
        const int64_t rowt = (b * L + t) * D;
        if (t + PF < L) {
            prefetch_row(a->delta + rowt + PF * D + span0, span);
            prefetch_row(a->u + rowt + PF * D + span0, span);
            if (a->z) prefetch_row(a->z + rowt + PF * D + span0, span);
        }
        for (int64_t i = 0; i < nq; ++i) {
            const block_t blk = block_of(s, q0 + i);
            float *hb = h + i * NP;
            const float *Ab = Al + i * NP, *Db = Dl + i * P, *bb = bl + i * P;
            if (a->saved && t % CK == 0)
                state_out(a->saved + ((b * s->nck + t / CK) * D + blk.d0) * N, hb, N, P, blk.nb);
            const int64_t row = rowt + blk.d0;
            const float *bt = a->Bm + ((b * L + t) * G + blk.g) * N;
            const float *ct = a->Cm + ((b * L + t) * G + blk.g) * N;
            for (int64_t dv = 0; dv < P; dv += VW) {
                const int64_t avail = blk.nb - dv;
                const vf dtv = vdt(vld_part(a->delta + row + dv, avail) + vld(bb + dv), s->softplus, NULL);
                const vf uv = vld_part(a->u + row + dv, avail), duv = dtv * uv;
                vf acc = vld(Db + dv) * uv;
                for (int64_t n = 0; n < N; ++n) {
                    float *hp = hb + n * P + dv;
                    vf hv = vexp(dtv * vld(Ab + n * P + dv)) * vld(hp) + duv * bt[n];
                    vst(hp, hv);
                    acc += hv * ct[n];
                }
                if (a->z) {
                    vf zv = vld_part(a->z + row + dv, avail);
                    acc *= zv * vsilu_sig(zv);
                }
                vst_part(a->y + row + dv, acc, avail);
            }
        }
    }
    for (int64_t i = 0; i < nq; ++i) {
        const block_t blk = block_of(s, q0 + i);
        state_out(a->hT + (b * D + blk.d0) * N, h + i * NP, N, P, blk.nb);
    }
}

/* ---------------------------------------------------------------- backward */

typedef struct {
    const float *gy, *gT, *saved, *u, *delta, *At, *Bm, *Cm, *Dv, *z, *bias;
    float *du, *ddelta, *dz, *dAp, *dBp, *dCp, *dDp, *dbp, *dh0;
} bwd_args;

static int64_t bwd_buf_floats(const dims_t *s)
{
    const int64_t S = s->bpu * s->NP, Q = s->bpu * s->P;
    return 3 * S + (2 * CK + 1) * S + 4 * CK * Q + 4 * Q + 2 * s->N * VW;
}

static void bwd_unit(const dims_t *s, const bwd_args *a, int64_t k, float *buf)
{
    const int64_t N = s->N, P = s->P, NP = s->NP, L = s->L, D = s->D, G = s->G;
    int64_t b, q0, nq, span0, span;
    unit_of(s, k, &b, &q0, &nq);
    unit_span(s, q0, nq, &span0, &span);
    const int64_t S = s->bpu * NP, Q = s->bpu * P; /* floats of the unit's state / of one row slice */
    float *g = buf, *Al = g + S, *dAl = Al + S;
    float *hs = dAl + S;            /* [CK + 1][S]: hs[i] = states before step t0 + i */
    float *dec = hs + (CK + 1) * S; /* [CK][S]: exp(dt A) of step t0 + i */
    float *dtb = dec + CK * S, *ub = dtb + CK * Q, *sgb = ub + CK * Q, *ypb = sgb + CK * Q;
    float *Dl = ypb + CK * Q, *bl = Dl + Q, *dDl = bl + Q, *dbl = dDl + Q;
    float *dBacc = dbl + Q, *dCacc = dBacc + N * VW;
    memset(buf, 0, (size_t)bwd_buf_floats(s) * sizeof(float));
    unit_consts(s, q0, nq, a->At, a->Dv, a->bias, Al, Dl, bl);
    for (int64_t i = 0; i < nq; ++i) {
        const block_t blk = block_of(s, q0 + i);
        if (a->gT) state_in(g + i * NP, a->gT + (b * D + blk.d0) * N, N, P, blk.nb);
    }

    for (int64_t c = s->nck - 1; c >= 0; --c) {
        const int64_t t0 = c * CK, len = (L - t0) < CK ? (L - t0) : CK;
        /* recompute the chunk: states, decays, dt, sigmoid(delta + bias), u and the pre-gate output */
        for (int64_t i = 0; i < nq; ++i) {
            const block_t blk = block_of(s, q0 + i);
            state_in(hs + i * NP, a->saved + ((b * s->nck + c) * D + blk.d0) * N, N, P, blk.nb);
        }
        for (int64_t r = 0; r < len; ++r) {
            const int64_t t = t0 + r, rowt = (b * L + t) * D;
            if (t + PF < L) {
                prefetch_row(a->delta + rowt + PF * D + span0, span);
                prefetch_row(a->u + rowt + PF * D + span0, span);
            }
            for (int64_t i = 0; i < nq; ++i) {
                const block_t blk = block_of(s, q0 + i);
                const int64_t row = rowt + blk.d0;
                const float *bt = a->Bm + ((b * L + t) * G + blk.g) * N;
                const float *ct = a->Cm + ((b * L + t) * G + blk.g) * N;
                const float *hprev = hs + r * S + i * NP, *Ab = Al + i * NP;
                float *hnext = hs + (r + 1) * S + i * NP, *de = dec + r * S + i * NP;
                float *dtr = dtb + r * Q + i * P, *ur = ub + r * Q + i * P, *sgr = sgb + r * Q + i * P;
                for (int64_t dv = 0; dv < P; dv += VW) {
                    const int64_t avail = blk.nb - dv;
                    vf sg = vset(1.0f);
                    const vf dtv = vdt(vld_part(a->delta + row + dv, avail) + vld(bl + i * P + dv), s->softplus, &sg);
                    const vf uv = vld_part(a->u + row + dv, avail), duv = dtv * uv;
                    vst(dtr + dv, dtv);
                    vst(ur + dv, uv);
                    vst(sgr + dv, sg);
                    vf acc = vld(Dl + i * P + dv) * uv;
                    for (int64_t n = 0; n < N; ++n) {
                        const int64_t o = n * P + dv;
                        vf e = vexp(dtv * vld(Ab + o));
                        vf hv = e * vld(hprev + o) + duv * bt[n];
                        vst(de + o, e);
                        vst(hnext + o, hv);
                        acc += hv * ct[n];
                    }
                    vst(ypb + r * Q + i * P + dv, acc);
                }
            }
        }
        /* reverse-time adjoint over the chunk */
        for (int64_t r = len - 1; r >= 0; --r) {
            const int64_t t = t0 + r, rowt = (b * L + t) * D;
            if (t - PF >= 0) {
                prefetch_row(a->gy + rowt - PF * D + span0, span);
                prefetch_row_w(a->du + rowt - PF * D + span0, span);
                prefetch_row_w(a->ddelta + rowt - PF * D + span0, span);
                if (a->z) {
                    prefetch_row(a->z + rowt - PF * D + span0, span);
                    prefetch_row_w(a->dz + rowt - PF * D + span0, span);
                }
            }
            for (int64_t i = 0; i < nq; ++i) {
                const block_t blk = block_of(s, q0 + i);
                const int64_t row = rowt + blk.d0;
                const float *bt = a->Bm + ((b * L + t) * G + blk.g) * N;
                const float *ct = a->Cm + ((b * L + t) * G + blk.g) * N;
                const float *hprev = hs + r * S + i * NP, *hcur = hs + (r + 1) * S + i * NP;
                const float *de = dec + r * S + i * NP, *Ab = Al + i * NP;
                const float *dtr = dtb + r * Q + i * P, *ur = ub + r * Q + i * P, *sgr = sgb + r * Q + i * P;
                float *gb = g + i * NP, *dAb = dAl + i * NP;
                for (int64_t dv = 0; dv < P; dv += VW) {
                    const int64_t avail = blk.nb - dv;
                    const vf dtv = vld(dtr + dv), uv = vld(ur + dv);
                    vf dyv = vld_part(a->gy + row + dv, avail);
                    if (a->z) { /* out = y_pre * silu(z) */
                        vf zv = vld_part(a->z + row + dv, avail), sz = vsilu_sig(zv);
                        vf yp = vld(ypb + r * Q + i * P + dv);
                        vst_part(a->dz + row + dv, dyv * yp * (sz * (1.0f + zv * (1.0f - sz))), avail);
                        dyv *= zv * sz;
                    }
                    const vf duv = dtv * uv;
                    vf ddt = vset(0.0f), dus = vset(0.0f);
                    for (int64_t n = 0; n < N; ++n) {
                        const int64_t o = n * P + dv;
                        vf gv = vld(gb + o) + dyv * ct[n];
                        vf ev = vld(de + o);
                        vf gh = gv * ev * vld(hprev + o);
                        vst(dCacc + n * VW, (dv ? vld(dCacc + n * VW) : vset(0.0f)) + vld(hcur + o) * dyv);
                        vst(dBacc + n * VW, (dv ? vld(dBacc + n * VW) : vset(0.0f)) + gv * duv);
                        ddt += gh * vld(Ab + o);
                        vst(dAb + o, vld(dAb + o) + gh * dtv);
                        dus += gv * bt[n];
                        vst(gb + o, gv * ev);
                    }
                    ddt = (ddt + uv * dus) * vld(sgr + dv);
                    vst_part(a->ddelta + row + dv, ddt, avail);
                    vst_part(a->du + row + dv, dus * dtv + vld(Dl + i * P + dv) * dyv, avail);
                    vst(dDl + i * P + dv, vld(dDl + i * P + dv) + dyv * uv);
                    vst(dbl + i * P + dv, vld(dbl + i * P + dv) + ddt);
                }
                float *dBo = a->dBp + (((b * L + t) * G + blk.g) * s->nbpg + blk.j) * N;
                float *dCo = a->dCp + (((b * L + t) * G + blk.g) * s->nbpg + blk.j) * N;
                for (int64_t n = 0; n < N; ++n) {
                    dBo[n] = vhsum(vld(dBacc + n * VW));
                    dCo[n] = vhsum(vld(dCacc + n * VW));
                }
            }
        }
    }
    for (int64_t i = 0; i < nq; ++i) {
        const block_t blk = block_of(s, q0 + i);
        state_out(a->dAp + (b * D + blk.d0) * N, dAl + i * NP, N, P, blk.nb);
        if (a->dh0) state_out(a->dh0 + (b * D + blk.d0) * N, g + i * NP, N, P, blk.nb);
        for (int64_t d = 0; d < blk.nb; ++d) {
            a->dDp[b * D + blk.d0 + d] = dDl[i * P + d];
            a->dbp[b * D + blk.d0 + d] = dbl[i * P + d];
        }
    }
}

/* ---------------------------------------------------------------- exported entry points */

static int run_units(const dims_t *s, int64_t k0, int64_t k1, int nthreads, int64_t buf_floats,
                     void (*body)(const dims_t *, const void *, int64_t, float *), const void *args)
{
    int failed = 0;
    if (nthreads <= 1) { /* no OpenMP region at all (also safe in forked workers) */
        float *buf = alloc_floats(buf_floats);
        if (!buf) return -1;
        for (int64_t k = k0; k < k1; ++k) body(s, args, k, buf);
        free(buf);
        return 0;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
#endif
    {
        float *buf = alloc_floats(buf_floats);
        if (!buf) failed = 1;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t k = k0; k < k1; ++k)
            if (buf) body(s, args, k, buf);
        free(buf);
    }
    return failed ? -1 : 0;
}

static void fwd_body(const dims_t *s, const void *a, int64_t k, float *buf) { fwd_unit(s, (const fwd_args *)a, k, buf); }
static void bwd_body(const dims_t *s, const void *a, int64_t k, float *buf) { bwd_unit(s, (const bwd_args *)a, k, buf); }

static dims_t make_dims(int64_t Bsz, int64_t L, int64_t D, int64_t N, int64_t G, int64_t bw, int64_t bpu,
                        int softplus)
{
    dims_t s;
    s.Bsz = Bsz; s.L = L; s.D = D; s.N = N; s.G = G;
    s.Dg = D / G;
    s.bw = bw;
    s.nbpg = (s.Dg + bw - 1) / bw;
    s.bpu = bpu;
    s.upb = (G * s.nbpg + bpu - 1) / bpu;
    s.P = (bw + VW - 1) / VW * VW;
    s.NP = N * s.P;
    s.nck = (L + CK - 1) / CK;
    s.softplus = softplus;
    return s;
}

/* 1 when compiled with OpenMP (the caller then passes the full unit range once), else 0. */
int mz_scan_has_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int mz_scan_ckpt(void) { return CK; }

/* Number of work units: B * ceil(blocks per row / bpu), with G * ceil((D / G) / bw) blocks per row. */
int64_t mz_scan_units(int64_t Bsz, int64_t D, int64_t G, int64_t bw, int64_t bpu)
{
    return Bsz * ((G * ((D / G + bw - 1) / bw) + bpu - 1) / bpu);
}

/* Forward over units [k0, k1). Optional pointers may be NULL (Dv, z, bias, h0, saved).
 * Returns 0, or -1 if a scratch allocation failed. */
int mz_scan_fwd(const float *u, const float *delta, const float *At, const float *Bm, const float *Cm,
                const float *Dv, const float *z, const float *bias, const float *h0,
                float *y, float *hT, float *saved,
                int64_t Bsz, int64_t L, int64_t D, int64_t N, int64_t G, int64_t bw, int64_t bpu, int softplus,
                int64_t k0, int64_t k1, int nthreads)
{
    const dims_t s = make_dims(Bsz, L, D, N, G, bw, bpu, softplus);
    const fwd_args a = {u, delta, At, Bm, Cm, Dv, z, bias, h0, y, hT, saved};
    return run_units(&s, k0, k1, nthreads, fwd_buf_floats(&s), fwd_body, &a);
}

/* Backward over units [k0, k1). Needs saved (all checkpoints). gT, Dv, z, bias, dz, dh0 may be NULL
 * (dz must be given with z). Per-unit partial sums: dAp [B, D, N], dBp/dCp [B, L, G, nbpg, N],
 * dDp/dbp [B, D]; reduce them with mz_scan_sum_mid. */
int mz_scan_bwd(const float *gy, const float *gT, const float *saved, const float *u, const float *delta,
                const float *At, const float *Bm, const float *Cm, const float *Dv, const float *z, const float *bias,
                float *du, float *ddelta, float *dz, float *dAp, float *dBp, float *dCp, float *dDp, float *dbp,
                float *dh0,
                int64_t Bsz, int64_t L, int64_t D, int64_t N, int64_t G, int64_t bw, int64_t bpu, int softplus,
                int64_t k0, int64_t k1, int nthreads)
{
    const dims_t s = make_dims(Bsz, L, D, N, G, bw, bpu, softplus);
    const bwd_args a = {gy, gT, saved, u, delta, At, Bm, Cm, Dv, z, bias,
                        du, ddelta, dz, dAp, dBp, dCp, dDp, dbp, dh0};
    return run_units(&s, k0, k1, nthreads, bwd_buf_floats(&s), bwd_body, &a);
}

static void sum_mid_row(const float *x, float *out, int64_t o, int64_t nsum, int64_t inner)
{
    float *dst = out + o * inner;
    const float *src = x + o * nsum * inner;
    memcpy(dst, src, (size_t)inner * sizeof(float));
    for (int64_t k = 1; k < nsum; ++k)
        for (int64_t i = 0; i < inner; ++i) dst[i] += src[k * inner + i];
}

/* out[o, i] = sum_k x[o, k, i] for x [outer, nsum, inner], summed in ascending k (fixed order). */
void mz_scan_sum_mid(const float *x, float *out, int64_t outer, int64_t nsum, int64_t inner, int nthreads)
{
    if (nthreads <= 1) {
        for (int64_t o = 0; o < outer; ++o) sum_mid_row(x, out, o, nsum, inner);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static)
#endif
    for (int64_t o = 0; o < outer; ++o) sum_mid_row(x, out, o, nsum, inner);
}
