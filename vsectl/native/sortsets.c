/* Per-dimension descending sort of variable-length sets, and its gradient: the sort inside GPO and its family.
 *
 * x is (B, K, D) with unit stride over D; set b has lengths[b] valid rows (1 <= n <= K). Every column (b, ·, d) is
 * sorted by Batcher's odd-even merge network for n elements (the network for the next power of two with every
 * comparator that touches a row >= n dropped: rows past n would be -inf and never move). The network runs on a block
 * of W columns at a time, copied into a buffer that stays in L1, so each comparator is a branch-free loop the
 * compiler vectorises over the columns. The source row of every sorted value is tracked for the backward pass.
 *
 * out (B, kout, D) receives the sorted values (rows >= n are zero); src (B, kout, D) the row each came from (src may
 * be NULL when no gradient is needed: inference then runs a values-only network, half the loads and stores).
 * The gradient maps a (B, kout, D) gradient back to (B, K, D): gx[b, src[b, k, d], d] = g[b, k, d] for k < n, and
 * zero for every row past n. Work is over sets b0 <= b < b1, so callers can split a batch across threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define W 64

/* Batcher's odd-even merge sort comparators for n elements; with pa == NULL only counts them. */
static int64_t batcher(int64_t n, int16_t *pa, int16_t *pb) {
    int64_t p2 = 1, c = 0;
    while (p2 < n) p2 *= 2;
    for (int64_t p = 1; p < p2; p *= 2)
        for (int64_t k = p; k >= 1; k /= 2)
            for (int64_t j = k % p; j < p2 - k; j += 2 * k)
                for (int64_t i = 0; i < k && i < p2 - j - k; i++) {
                    int64_t a = i + j, b = i + j + k;
                    if (a / (2 * p) == b / (2 * p) && b < n) {
                        if (pa) { pa[c] = (int16_t)a; pb[c] = (int16_t)b; }
                        c++;
                    }
                }
    return c;
}

static void sort_block(float *val, int32_t *idx, int64_t w, const int16_t *pa, const int16_t *pb, int64_t ncmp) {
    for (int64_t c = 0; c < ncmp; c++) {
        float *a = val + pa[c] * W, *b = val + pb[c] * W;
        int32_t *ia = idx + pa[c] * W, *ib = idx + pb[c] * W;
        for (int64_t m = 0; m < w; m++) {
            float va = a[m], vb = b[m];
            int32_t xa = ia[m], xb = ib[m];
            int s = vb > va;
            a[m] = s ? vb : va;
            b[m] = s ? va : vb;
            ia[m] = s ? xb : xa;
            ib[m] = s ? xa : xb;
        }
    }
}

/* The same network on values alone (no source rows): a max and a min per comparator. */
static void sort_block_values(float *val, int64_t w, const int16_t *pa, const int16_t *pb, int64_t ncmp) {
    for (int64_t c = 0; c < ncmp; c++) {
        float *a = val + pa[c] * W, *b = val + pb[c] * W;
        for (int64_t m = 0; m < w; m++) {
            float va = a[m], vb = b[m];
            int s = vb > va;
            a[m] = s ? vb : va;
            b[m] = s ? va : vb;
        }
    }
}

/* Returns 0, or -1 when a buffer could not be allocated (nothing is written then). */
int vsectl_sort_sets(const float *x, int64_t K, int64_t D, int64_t stride_b, int64_t stride_k,
                     const int64_t *lengths, int64_t kout, float *out, int16_t *src, int64_t b0, int64_t b1) {
    int64_t nmax = 1;
    for (int64_t b = b0; b < b1; b++)
        if (lengths[b] > nmax) nmax = lengths[b];
    int64_t cmax = batcher(nmax, NULL, NULL) + 1;  /* the network for n <= nmax has at most this many */
    int16_t *pa = malloc(sizeof(int16_t) * cmax), *pb = malloc(sizeof(int16_t) * cmax);
    float *val = malloc(sizeof(float) * W * nmax);
    int32_t *idx = malloc(sizeof(int32_t) * W * nmax);
    if (!pa || !pb || !val || !idx) {
        free(pa); free(pb); free(val); free(idx);
        return -1;
    }
    int64_t cur = -1, ncmp = 0;
    for (int64_t b = b0; b < b1; b++) {
        int64_t n = lengths[b];
        if (n != cur) { ncmp = batcher(n, pa, pb); cur = n; }
        float *ob = out + b * kout * D;
        int16_t *sb = src ? src + b * kout * D : NULL;
        for (int64_t d0 = 0; d0 < D; d0 += W) {
            int64_t w = D - d0 < W ? D - d0 : W;
            for (int64_t k = 0; k < n; k++) {
                const float *row = x + b * stride_b + k * stride_k + d0;
                for (int64_t m = 0; m < w; m++) val[k * W + m] = row[m];
                if (sb)
                    for (int64_t m = 0; m < w; m++) idx[k * W + m] = (int32_t)k;
            }
            if (sb)
                sort_block(val, idx, w, pa, pb, ncmp);
            else
                sort_block_values(val, w, pa, pb, ncmp);
            for (int64_t k = 0; k < n; k++)
                for (int64_t m = 0; m < w; m++) ob[k * D + d0 + m] = val[k * W + m];
            if (sb)
                for (int64_t k = 0; k < n; k++)
                    for (int64_t m = 0; m < w; m++) sb[k * D + d0 + m] = (int16_t)idx[k * W + m];
        }
        if (kout > n) {
            memset(ob + n * D, 0, sizeof(float) * (kout - n) * D);
            if (sb) memset(sb + n * D, 0, sizeof(int16_t) * (kout - n) * D);
        }
    }
    free(pa); free(pb); free(val); free(idx);
    return 0;
}

void vsectl_sort_sets_grad(const float *g, const int16_t *src, const int64_t *lengths, int64_t kout, int64_t K,
                           int64_t D, float *gx, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        int64_t n = lengths[b];
        float *gb = gx + b * K * D;
        const float *g_b = g + b * kout * D;
        const int16_t *s_b = src + b * kout * D;
        memset(gb, 0, sizeof(float) * K * D);
        for (int64_t k = 0; k < n; k++)
            for (int64_t d = 0; d < D; d++) gb[s_b[k * D + d] * D + d] = g_b[k * D + d];
    }
}
