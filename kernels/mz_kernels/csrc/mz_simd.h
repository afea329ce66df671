/* SIMD helpers shared by the mz_kernels C kernels (selective scan, causal conv1d).
 *
 * GCC/Clang vector types of VW floats (one hardware register: 16 with AVX-512, 8 with AVX, else 4),
 * a branch-free ~1 ulp exp, softplus, sigmoid, a fixed-order horizontal sum and partial loads/stores.
 * Included by sources built with mz_kernels/_cbuild.py, which puts this folder on the include path
 * and hashes it with the source.
 */
#ifndef MZ_SIMD_H
#define MZ_SIMD_H
#include <stdint.h>
#include <string.h>

/* Lanes per vector = one hardware register (wider generic vectors make GCC scalarise compares). */
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4 /* SSE, NEON, ... */
#endif

/* helpers taking or returning vectors are force-inlined (a vector passed to a real call may go through memory) */
#define VINL static inline __attribute__((always_inline))

typedef float vf __attribute__((vector_size(VW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VW * sizeof(int32_t))));

/* ---------------------------------------------------------------- vector helpers */

VINL vf vld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
VINL void vst(float *p, vf v) { memcpy(p, &v, sizeof v); }
VINL vf vset(float x) { return (vf){0} + x; }
VINL vf vsel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }
VINL vf vabs(vf x) { return (vf)((vi)x & 0x7fffffff); }

/* exp(x), branch-free, about 1 ulp: Cody-Waite reduction x = n ln2 + r with ln2 split in two
 * constants, a degree-6 polynomial for exp(r) on |r| <= ln2 / 2 (Cephes expf), then 2^n. */
#define EXP_POLY(r)                                                                                \
    vf p = vset(1.9875691500e-4f);                                                                 \
    p = p * r + 1.3981999507e-3f;                                                                  \
    p = p * r + 8.3334519073e-3f;                                                                  \
    p = p * r + 4.1665795894e-2f;                                                                  \
    p = p * r + 1.6666665459e-1f;                                                                  \
    p = p * r + 5.0000001201e-1f;                                                                  \
    vf y = p * (r * r) + r + 1.0f;

#if defined(__AVX512F__)
/* AVX-512: native min/max, round and scalef (2^n for any n, so exp underflows to 0 / overflows
 * to inf like expf; the clamp only keeps the reduction exact). */
#include <immintrin.h>
VINL vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
VINL vf vmin(vf a, vf b) { return (vf)_mm512_min_ps((__m512)a, (__m512)b); }
VINL vf vrcp(vf d) /* 1 / d to ~1 ulp: rcp14 and one Newton step */
{
    vf r = (vf)_mm512_rcp14_ps((__m512)d);
    return r * (2.0f - d * r);
}
VINL vf vexp(vf x)
{
    x = vmin(vmax(x, vset(-104.0f)), vset(89.0f));
    vf nf = (vf)_mm512_roundscale_ps((__m512)(x * 1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf r = x - nf * 0.693359375f;
    r = r + nf * 2.12194440e-4f;
    EXP_POLY(r)
    return (vf)_mm512_scalef_ps((__m512)y, (__m512)nf);
}
#else
/* Other targets: 2^n is built in the exponent bits, so the argument is clamped to [-87.3, 88.37] and exp
 * saturates at 1.2e-38 below and 2.5e38 above instead of 0 / inf. */
#if defined(__AVX__) && VW == 8
#include <immintrin.h>
VINL vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
VINL vf vmin(vf a, vf b) { return (vf)_mm256_min_ps((__m256)a, (__m256)b); }
#elif defined(__SSE__) && VW == 4
#include <immintrin.h>
VINL vf vmax(vf a, vf b) { return (vf)_mm_max_ps((__m128)a, (__m128)b); }
VINL vf vmin(vf a, vf b) { return (vf)_mm_min_ps((__m128)a, (__m128)b); }
#else
VINL vf vmax(vf a, vf b) { return vsel(a > b, a, b); }
VINL vf vmin(vf a, vf b) { return vsel(a < b, a, b); }
#endif
VINL vf vrcp(vf d) { return 1.0f / d; }
VINL vf vexp(vf x)
{
    x = vmin(vmax(x, vset(-87.33654f)), vset(88.37f));
    vf t = x * 1.44269504088896341f + 0.5f;
    vi n = __builtin_convertvector(t + 128.0f, vi) - 128; /* floor(t): t + 128 > 0 */
    vf nf = __builtin_convertvector(n, vf);
    vf r = x - nf * 0.693359375f;
    r = r + nf * 2.12194440e-4f;
    EXP_POLY(r)
    return y * (vf)((n + 127) << 23);
}
#endif

/* log(1 + e) for e in [0, 1]: 2 atanh(s), s = e / (2 + e) <= 1/3, odd series to s^13 (rel. err < 2e-8). */
VINL vf vlog1p01(vf e)
{
    vf s = e * vrcp(e + 2.0f);
    vf s2 = s * s;
    vf p = vset(1.0f / 13.0f);
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return 2.0f * s * p;
}

/* softplus(x) = max(x, 0) + log1p(exp(-|x|)) and sigmoid(x), both from e = exp(-|x|). */
VINL vf vsoftplus(vf x, vf e) { return vmax(x, vset(0.0f)) + vlog1p01(e); }
VINL vf vsigmoid(vf x, vf e)
{
    vf inv = vrcp(1.0f + e);
    return vsel(x >= 0.0f, inv, e * inv);
}

/* Fixed-order sum of the VW lanes: halve the vector down to four lanes, then add those. */
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));
#if VW >= 8
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
#endif
VINL float vhsum(vf v)
{
#if VW == 16
    union { vf v; vf8 h[2]; } a = {v};
    union { vf8 v; vf4 h[2]; } b = {a.h[0] + a.h[1]};
    vf4 c = b.h[0] + b.h[1];
#elif VW == 8
    union { vf v; vf4 h[2]; } b = {v};
    vf4 c = b.h[0] + b.h[1];
#else
    vf4 c = v;
#endif
    return (c[0] + c[2]) + (c[1] + c[3]);
}


/* Load VW floats from p, of which only the first `avail` exist (the rest read as 0). */
VINL vf vld_part(const float *p, int64_t avail)
{
    if (avail >= VW) return vld(p);
    float tmp[VW] = {0};
    for (int64_t i = 0; i < avail; ++i) tmp[i] = p[i];
    return vld(tmp);
}

/* Store the first `avail` (at most VW) lanes of v to p. */
VINL void vst_part(float *p, vf v, int64_t avail)
{
    if (avail >= VW) { vst(p, v); return; }
    float tmp[VW];
    vst(tmp, v);
    for (int64_t i = 0; i < avail; ++i) p[i] = tmp[i];
}


/* sigmoid(z), the factor of SiLU: silu(z) = z * vsilu_sig(z) */
VINL vf vsilu_sig(vf z) { return vsigmoid(z, vexp(-vabs(z))); }

#endif /* MZ_SIMD_H */
