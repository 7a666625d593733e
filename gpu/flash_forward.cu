// Fused forward of one ring step: fold attention of the q shard over one K/V shard into (o, lse).
//
// The GPU form of refimpl/blockwise.py: attend_shard + refimpl/tile.py: attend_tile and merge. One CTA
// takes BM = 16 ROW_TILES NWARPS query rows of one (batch, query head) and visits the plan's key tiles of
// its row block in sub-tiles of BN keys, double-buffered with cp.async. Each warp owns 16 ROW_TILES rows
// (ROW_TILES = 2 loads each K/V fragment once for two row tiles: half the shared-memory traffic per
// product, at twice the registers) and runs the online softmax (flash-attention 2) over the sub-tiles; at the end the step's partial (o, lse) is merged into the
// running accumulators with float64 weights, exactly the merge of specs/algorithm.md section 3.
//
// GQA: query head h reads kv head h / G from the K/V shard as it is; nothing is copied.
// Tiles: the host plan's FULL tiles are computed without a mask. A PARTIAL tile is refined per sub-tile
// from position ranges (refimpl/masks.py: classify): sub-tiles EMPTY for the whole CTA are not loaded,
// sub-tiles EMPTY for a warp are not computed by it, FULL ones need no mask.

#include "flash_common.cuh"

#ifndef ROW_TILES
#define ROW_TILES 1
#endif
#define MT ROW_TILES                    // 16-row tiles per warp
#define BN BLOCK_N                      // keys per sub-tile
#define BM (16 * MT * NWARPS)           // query rows per CTA
#define NB (BN / 8)

// q (B, nq, Hq, D), k and v (B, nk, Hkv, D) in the element type; o (B, nq, Hq, D) float32 and
// lse (B, Hq, nq) float64 running accumulators; q_pos (nq,), k_pos (nk,) global positions.
// cta (n_cta, 4): row0, row_end, first and end plan entry; cols (n_entries, 3): k_start, k_end, kind.
// Grid (n_cta, B * Hq), NTHREADS threads.
extern "C" __global__ void __launch_bounds__(NTHREADS)
flash_forward(const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
              float* __restrict__ o, double* __restrict__ lse, const i64* __restrict__ q_pos,
              const i64* __restrict__ k_pos, const int* __restrict__ cta, const int* __restrict__ cols, int nq,
              int nk, int Hq, int Hkv, int D, float scale, int mask) {
    extern __shared__ __align__(16) unsigned char smem[];
    elem_t* sQ = reinterpret_cast<elem_t*>(smem);
    elem_t* sK = sQ + BM * LDS;                 // [2][BN][LDS]
    elem_t* sV = sK + 2 * BN * LDS;             // [2][BN][LDS]

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int b = blockIdx.y / Hq, h = blockIdx.y % Hq, c = h / (Hq / Hkv);
    const int row0 = cta[4 * blockIdx.x], row_end = cta[4 * blockIdx.x + 1];
    int e = cta[4 * blockIdx.x + 2];
    const int e_end = cta[4 * blockIdx.x + 3];
    const i64 q_stride = (i64)Hq * D, kv_stride = (i64)Hkv * D;
    const elem_t* qb = q + ((i64)b * nq * Hq + h) * D;
    const elem_t* kb = k + ((i64)b * nk * Hkv + c) * D;
    const elem_t* vb = v + ((i64)b * nk * Hkv + c) * D;

    i64 qmin, qmax, wqmin, wqmax;               // query positions of the CTA, and of this warp's rows
    warp_range(q_pos, row0, row_end, qmin, qmax);
    const int wrow0 = row0 + 16 * MT * warp;
    warp_range(q_pos, wrow0, min(wrow0 + 16 * MT, row_end), wqmin, wqmax);
    i64 qp[MT][2];                              // this thread's rows: wrow0 + 16 mt + g + 8 r
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = wrow0 + 16 * mt + g + 8 * r;
            qp[mt][r] = row < row_end ? q_pos[row] : -1;
        }

    load_tile<BM>(sQ, qb, row0, row_end, q_stride, D);
    cp_async_commit();
    int n0 = e < e_end ? cols[3 * e] : 0, kind;
    i64 kmin, kmax;
    bool have = seek(e, n0, e_end, cols, k_pos, BN, false, mask, qmin, qmax, kind, kmin, kmax);
    if (have) {
        load_tile<BN>(sK, kb, n0, cols[3 * e + 1], kv_stride, D);
        load_tile<BN>(sV, vb, n0, cols[3 * e + 1], kv_stride, D);
    }
    cp_async_commit();

    const float sl = scale * SCORE_UNIT;        // scores in exp_unit's base
    float m[MT][2], l[MT][2];
    float acc[MT][ND][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        m[mt][0] = m[mt][1] = NEG_INF;
        l[mt][0] = l[mt][1] = 0.f;
        zero(acc[mt]);
    }

    for (int stage = 0; have; stage ^= 1) {
        int e2 = e, n2 = n0 + BN, kind2;
        i64 kmin2, kmax2;
        const bool have2 = seek(e2, n2, e_end, cols, k_pos, BN, false, mask, qmin, qmax, kind2, kmin2, kmax2);
        if (have2) {
            load_tile<BN>(sK + (stage ^ 1) * BN * LDS, kb, n2, cols[3 * e2 + 1], kv_stride, D);
            load_tile<BN>(sV + (stage ^ 1) * BN * LDS, vb, n2, cols[3 * e2 + 1], kv_stride, D);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        const int ke = cols[3 * e + 1];
        const int wkind = kind == KIND_FULL ? KIND_FULL : classify(mask, wqmin, wqmax, kmin, kmax);
        if (wrow0 < row_end && wkind != KIND_EMPTY) {
            float s[MT][NB][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) zero(s[mt]);
            gemm_nt<MT, NB>(s, sQ, 16 * MT * warp, sK + stage * BN * LDS);
            const bool masked = wkind == KIND_PARTIAL || n0 + BN > ke;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int j = 0; j < NB; ++j)
#pragma unroll
                    for (int x = 0; x < 4; ++x) {
                        const int col = n0 + j * 8 + 2 * t + (x & 1);
                        const bool ok = !masked || (col < ke && (wkind != KIND_PARTIAL ||
                                                                 visible(mask, qp[mt][x >> 1], k_pos[col])));
                        s[mt][j][x] = ok ? s[mt][j][x] * sl : NEG_INF;
                    }
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    float mx = NEG_INF;
#pragma unroll
                    for (int j = 0; j < NB; ++j) mx = fmaxf(mx, fmaxf(s[mt][j][2 * r], s[mt][j][2 * r + 1]));
                    const float m_new = fmaxf(m[mt][r], quad_max(mx));
                    const float m_use = m_new == NEG_INF ? 0.f : m_new;   // a row hidden so far: exp(-inf) = 0
                    const float alpha = exp_unit(m[mt][r] - m_use);
                    m[mt][r] = m_new;
                    l[mt][r] *= alpha;
#pragma unroll
                    for (int d = 0; d < ND; ++d) {
                        acc[mt][d][2 * r] *= alpha;
                        acc[mt][d][2 * r + 1] *= alpha;
                    }
#pragma unroll
                    for (int j = 0; j < NB; ++j) {
                        s[mt][j][2 * r] = exp_unit(s[mt][j][2 * r] - m_use);
                        s[mt][j][2 * r + 1] = exp_unit(s[mt][j][2 * r + 1] - m_use);
                        l[mt][r] += s[mt][j][2 * r] + s[mt][j][2 * r + 1];
                    }
                }
            }
            gemm_nn<MT, NB>(acc, s, sV + stage * BN * LDS);
        }
        __syncthreads();                        // every warp is done with this stage before it is refilled
        e = e2, n0 = n2, kind = kind2, kmin = kmin2, kmax = kmax2, have = have2;
    }
    cp_async_wait<0>();

    // Merge the step's partial into the running (o, lse): float64 weights (specs/algorithm.md section 3).
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float lsum = quad_sum(l[mt][r]);
            const int row = wrow0 + 16 * mt + g + 8 * r;
            if (row >= row_end || lsum == 0.f) continue;          // no visible key this step: the identity
            const double lse_p = (double)m[mt][r] * (TENSOR_CORES ? LN2 : 1.0) + log((double)lsum);
            double* lrow = lse + ((i64)b * Hq + h) * nq + row;
            const double lse_a = *lrow;
            const double hi = fmax(lse_a, lse_p), lo = fmin(lse_a, lse_p);
            const double lse_n = lo == NEG_INF_D ? hi : hi + log1p(exp(lo - hi));
            const float wa = (float)exp(lse_a - lse_n), wp = (float)(exp(lse_p - lse_n) / lsum);
            float* orow = o + ((i64)b * nq + row) * q_stride + (i64)h * D;
#pragma unroll
            for (int d = 0; d < ND; ++d) {
                const int col = d * 8 + 2 * t;
                if (col < D) {
                    float2 cur = *reinterpret_cast<float2*>(orow + col);
                    cur.x = wa * cur.x + wp * acc[mt][d][2 * r];
                    cur.y = wa * cur.y + wp * acc[mt][d][2 * r + 1];
                    *reinterpret_cast<float2*>(orow + col) = cur;
                }
            }
            if (t == 0) *lrow = lse_n;
        }
}
