// Fused backward of one ring step (flash-attention 2), as two deterministic kernels.
//
// The GPU form of refimpl/blockwise.py: attend_shard_backward + refimpl/tile.py: attend_tile_backward:
//
//     p  = exp(s - lse)       dv = p^T dout       dp = dout v^T
//     ds = p * (dp - delta)   dq = scale ds k     dk = scale ds^T q
//
// flash_backward_dq   one CTA per 16 NWARPS query rows of one (batch, query head): walks the plan's key tiles
//                     like the forward and adds scale * ds k into dq.
// flash_backward_dkdv one CTA per 16 NWARPS key rows of one (batch, kv head): walks the transposed plan (the
//                     query tiles of its key block), for each of the G query heads of the kv head, and adds
//                     dk, dv into the step's dK/dV accumulator. The G heads are summed in registers: GQA
//                     without copies and without atomics.
//
// Every output element is written by exactly one CTA, in a fixed order: the backward is bitwise
// reproducible. (flash-attention's default instead adds dq with atomics from the dk/dv pass; computing dq
// in its own pass costs two more products per tile, and buys determinism.)

#include "flash_common.cuh"

#define BN BLOCK_N                          // keys per sub-tile in the dq kernel
#define BM (16 * NWARPS)                    // rows per CTA: queries (dq) or keys (dk/dv)
#define BQ BLOCK_Q                          // queries per sub-tile in the dk/dv kernel
#define NB (BN / 8)
#define NQ (BQ / 8)

// q, dout (B, nq, Hq, D) and k, v (B, nk, Hkv, D) in the element type; lse, delta (B, Hq, nq) float32
// (lse with -inf replaced by 0); dq (B, nq, Hq, D) float32, added to. Plan as for flash_forward.
extern "C" __global__ void __launch_bounds__(NTHREADS)
flash_backward_dq(const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
                  const elem_t* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                  float* __restrict__ dq, const i64* __restrict__ q_pos, const i64* __restrict__ k_pos,
                  const int* __restrict__ cta, const int* __restrict__ cols, int nq, int nk, int Hq, int Hkv,
                  int D, float scale, int mask) {
    extern __shared__ __align__(16) unsigned char smem[];
    elem_t* sQ = reinterpret_cast<elem_t*>(smem);
    elem_t* sO = sQ + BM * LDS;                 // dout
    elem_t* sK = sO + BM * LDS;                 // [2][BN][LDS]
    elem_t* sV = sK + 2 * BN * LDS;             // [2][BN][LDS]

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int b = blockIdx.y / Hq, h = blockIdx.y % Hq, c = h / (Hq / Hkv);
    const int row0 = cta[4 * blockIdx.x], row_end = cta[4 * blockIdx.x + 1];
    int e = cta[4 * blockIdx.x + 2];
    const int e_end = cta[4 * blockIdx.x + 3];
    const i64 q_stride = (i64)Hq * D, kv_stride = (i64)Hkv * D;
    const elem_t* kb = k + ((i64)b * nk * Hkv + c) * D;
    const elem_t* vb = v + ((i64)b * nk * Hkv + c) * D;

    i64 qmin, qmax, wqmin, wqmax;
    warp_range(q_pos, row0, row_end, qmin, qmax);
    const int wrow0 = row0 + 16 * warp;
    warp_range(q_pos, wrow0, min(wrow0 + 16, row_end), wqmin, wqmax);
    i64 qp[2];
    float lse_r[2], delta_r[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = wrow0 + g + 8 * r;
        const bool valid = row < row_end;
        qp[r] = valid ? q_pos[row] : -1;
        lse_r[r] = valid ? lse[((i64)b * Hq + h) * nq + row] * SCORE_UNIT : POS_INF;
        delta_r[r] = valid ? delta[((i64)b * Hq + h) * nq + row] : 0.f;
    }

    load_tile<BM>(sQ, q + ((i64)b * nq * Hq + h) * D, row0, row_end, q_stride, D);
    load_tile<BM>(sO, dout + ((i64)b * nq * Hq + h) * D, row0, row_end, q_stride, D);
    cp_async_commit();
    int n0 = e < e_end ? cols[3 * e] : 0, kind;
    i64 kmin, kmax;
    bool have = seek(e, n0, e_end, cols, k_pos, BN, false, mask, qmin, qmax, kind, kmin, kmax);
    if (have) {
        load_tile<BN>(sK, kb, n0, cols[3 * e + 1], kv_stride, D);
        load_tile<BN>(sV, vb, n0, cols[3 * e + 1], kv_stride, D);
    }
    cp_async_commit();

    const float sl = scale * SCORE_UNIT;
    float acc[ND][4];
    zero(acc);

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
            const elem_t* K = sK + stage * BN * LDS;
            float p[NB][4], dp[NB][4];
            zero(p);
            zero(dp);
            gemm_nt<NB>(p, sQ, 16 * warp, K);
            gemm_nt<NB>(dp, sO, 16 * warp, sV + stage * BN * LDS);
            const bool masked = wkind == KIND_PARTIAL || n0 + BN > ke;
#pragma unroll
            for (int j = 0; j < NB; ++j)
#pragma unroll
                for (int x = 0; x < 4; ++x) {
                    const int col = n0 + j * 8 + 2 * t + (x & 1), r = x >> 1;
                    const bool ok = !masked || (col < ke && (wkind != KIND_PARTIAL || visible(mask, qp[r], k_pos[col])));
                    const float pr = ok ? exp_unit(p[j][x] * sl - lse_r[r]) : 0.f;
                    p[j][x] = pr * (dp[j][x] - delta_r[r]);                 // ds
                }
            gemm_nn<NB>(acc, p, K);
        }
        __syncthreads();
        e = e2, n0 = n2, kind = kind2, kmin = kmin2, kmax = kmax2, have = have2;
    }
    cp_async_wait<0>();

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = wrow0 + g + 8 * r;
        if (row >= row_end) continue;
        float* out = dq + ((i64)b * nq + row) * q_stride + (i64)h * D;
#pragma unroll
        for (int d = 0; d < ND; ++d) {
            const int col = d * 8 + 2 * t;
            if (col < D) {
                float2 cur = *reinterpret_cast<float2*>(out + col);
                cur.x += scale * acc[d][2 * r];
                cur.y += scale * acc[d][2 * r + 1];
                *reinterpret_cast<float2*>(out + col) = cur;
            }
        }
    }
}

// Inputs as for flash_backward_dq; dk, dv (B, nk, Hkv, D) float32, added to.
// cta (n_cta, 4): key row0, row_end, first and end entry of `rows` (n_entries, 3): q_start, q_end, kind,
// the plan's tiles of this key block in ascending query order. Grid (n_cta, B * Hkv).
extern "C" __global__ void __launch_bounds__(NTHREADS)
flash_backward_dkdv(const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
                    const elem_t* __restrict__ dout, const float* __restrict__ lse,
                    const float* __restrict__ delta, float* __restrict__ dk, float* __restrict__ dv,
                    const i64* __restrict__ q_pos, const i64* __restrict__ k_pos, const int* __restrict__ cta,
                    const int* __restrict__ rows, int nq, int nk, int Hq, int Hkv, int D, float scale, int mask) {
    extern __shared__ __align__(16) unsigned char smem[];
    elem_t* sK = reinterpret_cast<elem_t*>(smem);
    elem_t* sV = sK + BM * LDS;
    elem_t* sQ = sV + BM * LDS;                 // [2][BQ][LDS]
    elem_t* sO = sQ + 2 * BQ * LDS;             // [2][BQ][LDS] dout
    float* sL = reinterpret_cast<float*>(sO + 2 * BQ * LDS);   // [2][BQ] lse, in score units
    float* sD = sL + 2 * BQ;                                   // [2][BQ] delta

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int b = blockIdx.y / Hkv, c = blockIdx.y % Hkv, G = Hq / Hkv;
    const int row0 = cta[4 * blockIdx.x], row_end = cta[4 * blockIdx.x + 1];
    const int e_begin = cta[4 * blockIdx.x + 2], e_end = cta[4 * blockIdx.x + 3];
    const i64 q_stride = (i64)Hq * D, kv_stride = (i64)Hkv * D;
    const float sl = scale * SCORE_UNIT;

    i64 kmin, kmax, wkmin, wkmax;
    warp_range(k_pos, row0, row_end, kmin, kmax);
    const int wrow0 = row0 + 16 * warp;
    warp_range(k_pos, wrow0, min(wrow0 + 16, row_end), wkmin, wkmax);
    i64 kp[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) kp[r] = wrow0 + g + 8 * r < row_end ? k_pos[wrow0 + g + 8 * r] : -1;

    load_tile<BM>(sK, k + ((i64)b * nk * Hkv + c) * D, row0, row_end, kv_stride, D);
    load_tile<BM>(sV, v + ((i64)b * nk * Hkv + c) * D, row0, row_end, kv_stride, D);
    cp_async_commit();

    // Sub-tiles are visited for head gi = 0 .. G-1 of this kv head, each over the entries' query tiles.
    auto load_queries = [&](int stage, int gi, int ent, int m0) {
        const int h = c * G + gi, qe = rows[3 * ent + 1];
        load_tile<BQ>(sQ + stage * BQ * LDS, q + ((i64)b * nq * Hq + h) * D, m0, qe, q_stride, D);
        load_tile<BQ>(sO + stage * BQ * LDS, dout + ((i64)b * nq * Hq + h) * D, m0, qe, q_stride, D);
        for (int i = threadIdx.x; i < BQ; i += NTHREADS) {
            const bool valid = m0 + i < qe;    // a missing query: p = exp(s - inf) = 0
            sL[stage * BQ + i] = valid ? lse[((i64)b * Hq + h) * nq + m0 + i] * SCORE_UNIT : POS_INF;
            sD[stage * BQ + i] = valid ? delta[((i64)b * Hq + h) * nq + m0 + i] : 0.f;
        }
    };
    int gi = 0, e = e_begin, n0 = e < e_end ? rows[3 * e] : 0, kind;
    i64 qmin, qmax;
    bool have = G > 0 && seek(e, n0, e_end, rows, q_pos, BQ, true, mask, kmin, kmax, kind, qmin, qmax);
    if (have) load_queries(0, gi, e, n0);
    cp_async_commit();

    float dK[ND][4], dV[ND][4];
    zero(dK);
    zero(dV);
    for (int stage = 0; have; stage ^= 1) {
        int gi2 = gi, e2 = e, n2 = n0 + BQ, kind2;
        i64 qmin2, qmax2;
        bool have2 = seek(e2, n2, e_end, rows, q_pos, BQ, true, mask, kmin, kmax, kind2, qmin2, qmax2);
        if (!have2 && ++gi2 < G) {              // the next query head: the same tiles again
            e2 = e_begin;
            n2 = rows[3 * e2];
            have2 = seek(e2, n2, e_end, rows, q_pos, BQ, true, mask, kmin, kmax, kind2, qmin2, qmax2);
        }
        if (have2) {
            load_queries(stage ^ 1, gi2, e2, n2);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        const int wkind = kind == KIND_FULL ? KIND_FULL : classify(mask, qmin, qmax, wkmin, wkmax);
        if (wrow0 < row_end && wkind != KIND_EMPTY) {
            const elem_t* Q = sQ + stage * BQ * LDS;
            const elem_t* O = sO + stage * BQ * LDS;
            float p[NQ][4], dp[NQ][4];
            zero(p);
            zero(dp);
            gemm_nt<NQ>(p, sK, 16 * warp, Q);                          // s^T: keys x queries
            gemm_nt<NQ>(dp, sV, 16 * warp, O);                         // dp^T = v dout^T
#pragma unroll
            for (int j = 0; j < NQ; ++j)
#pragma unroll
                for (int x = 0; x < 4; ++x) {
                    const int i = j * 8 + 2 * t + (x & 1);
                    const bool ok = wkind != KIND_PARTIAL || visible(mask, q_pos[min(n0 + i, nq - 1)], kp[x >> 1]);
                    p[j][x] = ok ? exp_unit(p[j][x] * sl - sL[stage * BQ + i]) : 0.f;
                }
            gemm_nn<NQ>(dV, p, O);                                     // dv += p^T dout
#pragma unroll
            for (int j = 0; j < NQ; ++j)
#pragma unroll
                for (int x = 0; x < 4; ++x) p[j][x] *= dp[j][x] - sD[stage * BQ + j * 8 + 2 * t + (x & 1)];
            gemm_nn<NQ>(dK, p, Q);                                     // dk += ds^T q
        }
        __syncthreads();
        gi = gi2, e = e2, n0 = n2, kind = kind2, qmin = qmin2, qmax = qmax2, have = have2;
    }
    cp_async_wait<0>();

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = wrow0 + g + 8 * r;
        if (row >= row_end) continue;
        const i64 at = ((i64)b * nk + row) * kv_stride + (i64)c * D;
#pragma unroll
        for (int d = 0; d < ND; ++d) {
            const int col = d * 8 + 2 * t;
            if (col < D) {
                float2 a = *reinterpret_cast<float2*>(dk + at + col), w = *reinterpret_cast<float2*>(dv + at + col);
                a.x += scale * dK[d][2 * r];
                a.y += scale * dK[d][2 * r + 1];
                w.x += dV[d][2 * r];
                w.y += dV[d][2 * r + 1];
                *reinterpret_cast<float2*>(dk + at + col) = a;
                *reinterpret_cast<float2*>(dv + at + col) = w;
            }
        }
    }
}
