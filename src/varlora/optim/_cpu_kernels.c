/* Fused fp32 CPU kernels of IVON (Shen et al., ICML 2024, arXiv:2402.17641), loaded by _cpu_kernels.py.
 *
 * PyTorch's eager CPU ops cost IVON about twenty passes over its buffers per step, and its CPU normal
 * generator (Mersenne Twister, one value at a time) about 2.4 ns a value, more than a whole AdamW step.
 * Here each phase of a step is one pass and the noise comes from a vectorised generator.
 *
 * The math is that of _functional.py (same symbols, same operations, fp32 throughout); a tensor argument
 * is an array of `count` pointers to contiguous fp32 arrays of `sizes[k]` elements (one per parameter).
 * Built with -O3 -fno-math-errno, the CPU's -march/-mcpu=native and -fopenmp-simd where the compiler takes
 * them (see _cpu_kernels.py), never -ffast-math: IEEE semantics hold
 * (NaN and inf propagate, 1/sqrtf is exact); the compiler may contract a*b+c into an FMA, as PyTorch's
 * vectorised CPU kernels do, so results agree with the eager path to rounding, not bit for bit.
 */
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__) && !defined(VL_NO_LIBMVEC)
/* glibc's libmvec has SIMD versions of these; math.h declares them only under -ffast-math. Without libmvec
 * (-DVL_NO_LIBMVEC, or another compiler or C library) the loops below call the scalar libm: same results
 * to rounding, slower. */
__attribute__((simd("notinbranch"))) float logf(float);
__attribute__((simd("notinbranch"))) float sinf(float);
__attribute__((simd("notinbranch"))) float cosf(float);
#endif

/* ---------------------------------------------------------------------------------------- noise */

#define LANES 16 /* independent xoshiro128+ generators advanced side by side (one SIMD register) */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* out[0..n) <- N(0, 1) draws determined by `seed` alone.
 *
 * LANES xoshiro128+ generators (Blackman & Vigna 2018), seeded by SplitMix64 from `seed`, each give one
 * 32-bit value per round; the top 24 bits make a uniform u in (0, 1) (centred on the 2^-24 grid, so never
 * 0 or 1, |z| <= 5.9). Box-Muller turns each pair (u1, u2) of lanes into two normals:
 * r = sqrt(-2 ln u1), z1 = r cos(2 pi u2), z2 = r sin(2 pi u2). The lane loops vectorise (libmvec's
 * logf/sinf/cosf on x86-64 glibc), about 0.4-0.7 ns a value on one core. Each call is single-threaded:
 * the caller splits a draw into seeded substreams. */
void vl_fill_normal(float *out, int64_t n, uint64_t seed) {
    uint32_t s0[LANES], s1[LANES], s2[LANES], s3[LANES];
    for (int l = 0; l < LANES; l++) {
        uint64_t a = splitmix64(&seed), b = splitmix64(&seed);
        s0[l] = (uint32_t)a;
        s1[l] = (uint32_t)(a >> 32);
        s2[l] = (uint32_t)b;
        s3[l] = (uint32_t)(b >> 32);
        if (!(s0[l] | s1[l] | s2[l] | s3[l])) s0[l] = 1; /* the all-zero state is a fixed point */
    }
    float u[2][LANES], radius[LANES], z[2 * LANES];
    for (int64_t i = 0; i < n; i += 2 * LANES) {
        for (int r = 0; r < 2; r++) {
#pragma omp simd
            for (int l = 0; l < LANES; l++) {
                uint32_t result = s0[l] + s3[l], t = s1[l] << 9;
                s2[l] ^= s0[l];
                s3[l] ^= s1[l];
                s1[l] ^= s2[l];
                s0[l] ^= s3[l];
                s2[l] ^= t;
                s3[l] = (s3[l] << 11) | (s3[l] >> 21);
                u[r][l] = (float)(result >> 8) * 0x1p-24f + 0x1p-25f;
            }
        }
#pragma omp simd
        for (int l = 0; l < LANES; l++) radius[l] = sqrtf(-2.0f * logf(u[0][l]));
#pragma omp simd
        for (int l = 0; l < LANES; l++) z[l] = radius[l] * cosf(6.2831853071795864f * u[1][l]);
#pragma omp simd
        for (int l = 0; l < LANES; l++) z[LANES + l] = radius[l] * sinf(6.2831853071795864f * u[1][l]);
        int64_t m = n - i < 2 * LANES ? n - i : 2 * LANES;
        for (int64_t k = 0; k < m; k++) out[i + k] = z[k];
    }
}

/* ------------------------------------------------------------------------------------- sampling */

/* Per element: eta <- eps / sqrt(h + delta) (noise holds eps on entry, eta on return), backup <- theta,
 * theta <- theta + value * eta with value = sqrt(tau / lambda): theta = m + sqrt(tau) sigma eps. */
void vl_perturb(int64_t count, const int64_t *sizes, float *const *params, float *const *backups,
                float *const *noises, const float *const *hessians, double weight_decay, double value) {
    const float wd = (float)weight_decay, v = (float)value;
    for (int64_t k = 0; k < count; k++) {
        float *restrict p = params[k], *restrict backup = backups[k], *restrict noise = noises[k];
        const float *restrict h = hessians[k];
#pragma omp simd
        for (int64_t i = 0; i < sizes[k]; i++) {
            const float eta = noise[i] * (1.0f / sqrtf(h[i] + wd));
            noise[i] = eta;
            backup[i] = p[i];
            p[i] = p[i] + v * eta;
        }
    }
}

/* Add one sample's gradient g to the step's sums: grad_sum (+)= g, hess_sum (+)= g * eta (price) or
 * g * g (gradsq); `first` starts the sums instead. hess_sum may be the noise buffer itself. */
void vl_accumulate(int64_t count, const int64_t *sizes, float *const *grad_sums, float *const *hess_sums,
                   const float *const *grads, const float *const *noises, int first, int price) {
    for (int64_t k = 0; k < count; k++) {
        float *restrict gsum = grad_sums[k];
        float *hsum = hess_sums[k];
        const float *restrict g = grads[k];
        const float *other = price ? noises[k] : grads[k];
        if (first) {
#pragma omp simd
            for (int64_t i = 0; i < sizes[k]; i++) {
                gsum[i] = g[i];
                hsum[i] = other[i] * g[i];
            }
        } else {
#pragma omp simd
            for (int64_t i = 0; i < sizes[k]; i++) {
                gsum[i] += g[i];
                hsum[i] += other[i] * g[i];
            }
        }
    }
}

/* ----------------------------------------------------------------------------------------- update */

/* One IVON update in one pass (see update_ in _functional.py), per element, with S = num_samples,
 * s = hess_scale (sqrt(lambda)/S for price, lambda/S for gradsq), b = bias_correction, rho b = radius:
 *   g <- grad_sum / S;  mom <- lerp(mom, g, 1 - beta1)
 *   D <- h - s hess_sum (h + delta)  (price)  or  h - s hess_sum  (gradsq)
 *   h <- h - (1 - beta2) D + 1/2 (1 - beta2)^2 D^2 / (h + delta)
 *   u <- (mom + delta b m) / (h + delta);  m <- m - lr / b clip(u, +-rho b)
 * Returns the number of clipped coordinates. */
int64_t vl_update(int64_t count, const int64_t *sizes, float *const *means, const float *const *grad_sums,
                  const float *const *hess_sums, float *const *momenta, float *const *hessians, int64_t num_samples,
                  double hess_scale, double beta1, double beta2, double weight_decay, double radius,
                  double bias_correction, double lr, int price) {
    const float w = (float)(1.0 - beta1), scale = (float)hess_scale, wd = (float)weight_decay;
    const float keep = (float)(-(1.0 - beta2)), curv = (float)(0.5 * (1.0 - beta2) * (1.0 - beta2));
    const float decay = (float)(weight_decay * bias_correction), rad = (float)radius;
    const float step = (float)(-lr / bias_correction), samples = (float)num_samples;
    int64_t clipped = 0;
    for (int64_t k = 0; k < count; k++) {
        float *restrict m = means[k], *restrict mom = momenta[k], *restrict h = hessians[k];
        const float *restrict gsum = grad_sums[k], *restrict hsum = hess_sums[k];
#pragma omp simd reduction(+ : clipped)
        for (int64_t i = 0; i < sizes[k]; i++) {
            const float g = num_samples > 1 ? gsum[i] / samples : gsum[i];
            /* torch.lerp: a + w (b - a) for |w| < 0.5, else b - (b - a)(1 - w) */
            const float mo = w < 0.5f ? mom[i] + w * (g - mom[i]) : g - (g - mom[i]) * (1.0f - w);
            const float hd = h[i] + wd;
            const float d = price ? h[i] + (-scale) * hsum[i] * hd : h[i] + (-scale) * hsum[i];
            const float hn = (h[i] + keep * d) + curv * (d * d / hd);
            const float u = wd != 0.0f ? (mo + decay * m[i]) / (hn + wd) : mo / hn;
            const float out = u < -rad ? -rad : (u > rad ? rad : u);
            clipped += out != u;
            mom[i] = mo;
            h[i] = hn;
            m[i] = m[i] + step * out;
        }
    }
    return clipped;
}
