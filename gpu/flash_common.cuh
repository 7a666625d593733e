// Shared pieces of the fused flash-attention kernels (flash_forward.cu, flash_backward.cu).
//
// The kernels run one ring step: the tiles that refimpl/schedule.py: plan_tiles kept for (q shard, K/V
// shard), handed over as int arrays (gpu/kernels.py: DevicePlan). Every kernel is the same few warp-level
// products, on 16-row slabs, in the register layout of the tensor cores' mma.m16n8k16:
//
//     gemm_nt   C[16 x 8*NB] += A[16 x DP] . B^T     A, B row-major in shared memory (B as [n][k]): q k^T
//     gemm_nn   C[16 x DP]   += P[16 x 16*KS] . B     P in C-fragment registers, B as [k][n]:         p v
//
// A C fragment (float c[4]) of thread lane = 4 g + t holds rows g, g + 8 and columns 2t, 2t + 1 of one
// 8-column chunk: c[0], c[1] on row g, c[2], c[3] on row g + 8. Row statistics (max, sum) are reduced
// over the 4 threads t of a quad.
//
// Compile-time parameters (the loader, gpu/kernels.py, passes them with -D):
//     ELEM           0: float16, 1: bfloat16 (tensor cores, fp32 accumulation); 2: float32 (SIMT FMA)
//     HEAD_DIM_PAD   the head dimension rounded up to a multiple of 16; the run-time D may be smaller
// The sources are self-contained (no CUDA headers), so NVRTC and nvcc compile them the same way.

#pragma once

#include "elem.cuh"

#ifndef HEAD_DIM_PAD
#error "compile with -DHEAD_DIM_PAD=<head dim rounded up to a multiple of 16>"
#endif
#if HEAD_DIM_PAD % 16 != 0 || HEAD_DIM_PAD > 128
#error "HEAD_DIM_PAD must be a multiple of 16, at most 128"
#endif
#if !defined(NWARPS) || !defined(BLOCK_N) || !defined(BLOCK_Q)
#error "compile with -DNWARPS, -DBLOCK_N (keys per sub-tile) and -DBLOCK_Q (queries per dk/dv sub-tile)"
#endif

#if BLOCK_N % 16 || BLOCK_Q % 16
#error "BLOCK_N and BLOCK_Q must be multiples of 16"
#endif

#define NTHREADS (32 * NWARPS)
#define DP HEAD_DIM_PAD
#define ND (DP / 8)                 // 8-column chunks of a head-dim-wide C fragment
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453

// Tile kinds of the plan (refimpl/masks.py) and masks (refimpl/masks.py: NoMask, CausalMask).
#define KIND_PARTIAL 1
#define KIND_FULL 2
#define KIND_EMPTY 0
#define MASK_NONE 0
#define MASK_CAUSAL 1

#define TENSOR_CORES (ELEM != 2)
#define LDS (DP + 16 / (int)sizeof(elem_t))   // shared-memory row stride: +16 bytes breaks bank conflicts

#define NEG_INF (-__int_as_float(0x7f800000))
#define POS_INF (__int_as_float(0x7f800000))
#define NEG_INF_D (-__longlong_as_double(0x7ff0000000000000LL))

// ---- exponentials ------------------------------------------------------------------------------------
// Tensor-core kernels keep scores in base 2 (s * scale * log2 e) and use exp2, as flash-attention does;
// the float32 kernels use exp of the natural-log scores, exactly like a plain float32 softmax.
#if TENSOR_CORES
#define SCORE_UNIT LOG2E
__device__ __forceinline__ float exp_unit(float x) { return exp2f(x); }
#else
#define SCORE_UNIT 1.0f
__device__ __forceinline__ float exp_unit(float x) { return expf(x); }
#endif

// ---- shared-memory addresses, async copies -----------------------------------------------------------
__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

// 16 bytes global -> shared; when !valid nothing is read and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

// Rows [row0, row0 + ROWS) of a (rows, D) slab with row stride `stride` elements into a [ROWS][LDS] tile.
// Rows at or past row_end and columns at or past D are zero-filled. Issued by the whole CTA.
template <int ROWS>
__device__ __forceinline__ void load_tile(elem_t* tile, const elem_t* base, int row0, int row_end, i64 stride,
                                          int D) {
    const int per_chunk = 16 / sizeof(elem_t);
    const int chunks = DP / per_chunk;
    for (int i = threadIdx.x; i < ROWS * chunks; i += NTHREADS) {
        const int r = i / chunks, col = (i % chunks) * per_chunk, row = row0 + r;
        const bool valid = row < row_end && col < D;
        cp_async16(tile + r * LDS + col, valid ? base + row * stride + col : base, valid);
    }
}

// ---- masks -------------------------------------------------------------------------------------------
__device__ __forceinline__ bool visible(int mask, i64 q, i64 k) { return mask == MASK_NONE || k <= q; }

// The class of a block of pairs from position ranges, as refimpl/masks.py: classify.
__device__ __forceinline__ int classify(int mask, i64 qmin, i64 qmax, i64 kmin, i64 kmax) {
    if (mask == MASK_NONE) return KIND_FULL;
    if (kmin > qmax) return KIND_EMPTY;
    if (kmax <= qmin) return KIND_FULL;
    return KIND_PARTIAL;
}

// min and max of pos[lo .. hi) over the warp; every lane gets the result.
// An empty range gives (max, min) = (+big, -big), which classify() calls EMPTY under every real mask.
__device__ __forceinline__ void warp_range(const i64* pos, int lo, int hi, i64& mn, i64& mx) {
    const int lane = threadIdx.x & 31;
    mn = 0x7fffffffffffffffLL;
    mx = -0x7fffffffffffffffLL;
    for (int i = lo + lane; i < hi; i += 32) {
        const i64 p = pos[i];
        mn = p < mn ? p : mn;
        mx = p > mx ? p : mx;
    }
    for (int o = 16; o > 0; o >>= 1) {
        const i64 a = __shfl_xor_sync(0xffffffffu, mn, o), b = __shfl_xor_sync(0xffffffffu, mx, o);
        mn = a < mn ? a : mn;
        mx = b > mx ? b : mx;
    }
}

// The first sub-tile of at most `width` positions at or after (e, n0) of the plan entries [e, e_end)
// (rows of `ent`: start, end, kind) that the mask does not hide from the CTA's own positions
// [own_min, own_max]; sets the sub-tile's kind and position range [pmin, pmax]. The entries hold key
// blocks (forward, dq) or, with `entries_are_queries`, query blocks (dk/dv).
__device__ __forceinline__ bool seek(int& e, int& n0, int e_end, const int* ent, const i64* pos, int width,
                                     bool entries_are_queries, int mask, i64 own_min, i64 own_max, int& kind,
                                     i64& pmin, i64& pmax) {
    while (e < e_end) {
        const int pe = ent[3 * e + 1];
        if (n0 >= pe) {
            if (++e < e_end) n0 = ent[3 * e];
            continue;
        }
        warp_range(pos, n0, min(n0 + width, pe), pmin, pmax);
        if (ent[3 * e + 2] == KIND_FULL)
            kind = KIND_FULL;
        else
            kind = entries_are_queries ? classify(mask, pmin, pmax, own_min, own_max)
                                       : classify(mask, own_min, own_max, pmin, pmax);
        if (kind != KIND_EMPTY) return true;
        n0 += width;
    }
    return false;
}

// ---- quad reductions (the 4 threads holding one row of a C fragment) ----------------------------------
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

#if TENSOR_CORES
// ---- tensor-core path: ldmatrix + mma.sync.m16n8k16, fp32 accumulation ---------------------------------
__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(u32 (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

__device__ __forceinline__ void mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#if ELEM == 1
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
#endif
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// C[16 MT x 8 NB] += A[16 MT x DP] . B^T. A: rows row0 .. row0 + 16 MT - 1 of a [.][LDS] tile; B: rows
// 0 .. 8 NB - 1. Each B fragment is loaded once and used for the MT row tiles.
template <int MT, int NB>
__device__ __forceinline__ void gemm_nt(float (&c)[MT][NB][4], const elem_t* A, int row0, const elem_t* B) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int ks = 0; ks < DP / 16; ++ks) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            ldsm_x4(a[mt], A + (row0 + 16 * mt + (lane & 15)) * LDS + ks * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int j = 0; j < NB; j += 2) {
            u32 b[4];
            ldsm_x4(b, B + (j * 8 + (lane >> 4) * 8 + (lane & 7)) * LDS + ks * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma(c[mt][j], a[mt], b[0], b[1]);
                mma(c[mt][j + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// C[16 MT x DP] += P[16 MT x 8 NB] . B, P in C fragments (rounded to the element type for the tensor
// cores), B: rows 0 .. 8 NB - 1 of a [.][LDS] tile, stored [k][n].
template <int MT, int NB>
__device__ __forceinline__ void gemm_nn(float (&c)[MT][ND][4], const float (&p)[MT][NB][4], const elem_t* B) {
    const int lane = threadIdx.x & 31, m = lane >> 3;
#pragma unroll
    for (int kk = 0; kk < NB / 2; ++kk) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            a[mt][0] = pack2(p[mt][2 * kk][0], p[mt][2 * kk][1]);
            a[mt][1] = pack2(p[mt][2 * kk][2], p[mt][2 * kk][3]);
            a[mt][2] = pack2(p[mt][2 * kk + 1][0], p[mt][2 * kk + 1][1]);
            a[mt][3] = pack2(p[mt][2 * kk + 1][2], p[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int j = 0; j < ND; j += 2) {
            u32 b[4];
            ldsm_x4_trans(b, B + (kk * 16 + (m & 1) * 8 + (lane & 7)) * LDS + j * 8 + (m >> 1) * 8);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma(c[mt][j], a[mt], b[0], b[1]);
                mma(c[mt][j + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

#else
// ---- float32 path: the same fragments, computed with FMA from shared memory -----------------------------
template <int MT, int NB>
__device__ __forceinline__ void gemm_nt(float (&c)[MT][NB][4], const float* A, int row0, const float* B) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll 4
    for (int k = 0; k < DP; ++k) {
        float y0[NB], y1[NB];
#pragma unroll
        for (int j = 0; j < NB; ++j) {
            y0[j] = B[(j * 8 + 2 * t) * LDS + k];
            y1[j] = B[(j * 8 + 2 * t + 1) * LDS + k];
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const float x0 = A[(row0 + 16 * mt + g) * LDS + k], x1 = A[(row0 + 16 * mt + g + 8) * LDS + k];
#pragma unroll
            for (int j = 0; j < NB; ++j) {
                c[mt][j][0] = fmaf(x0, y0[j], c[mt][j][0]);
                c[mt][j][1] = fmaf(x0, y1[j], c[mt][j][1]);
                c[mt][j][2] = fmaf(x1, y0[j], c[mt][j][2]);
                c[mt][j][3] = fmaf(x1, y1[j], c[mt][j][3]);
            }
        }
    }
}

// P's entries for key column 2 t' + e of chunk j live in lane 4 g + t'; they are broadcast in the quad.
template <int MT, int NB>
__device__ __forceinline__ void gemm_nn(float (&c)[MT][ND][4], const float (&p)[MT][NB][4], const float* B) {
    const int lane = threadIdx.x & 31, t = lane & 3;
#pragma unroll
    for (int j = 0; j < NB; ++j) {
#pragma unroll
        for (int src = 0; src < 4; ++src) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float* b = B + (j * 8 + 2 * src + e) * LDS + 2 * t;
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const float p0 = __shfl_sync(0xffffffffu, p[mt][j][e], (lane & ~3) | src);
                    const float p1 = __shfl_sync(0xffffffffu, p[mt][j][2 + e], (lane & ~3) | src);
#pragma unroll
                    for (int d = 0; d < ND; ++d) {
                        const float2 y = *reinterpret_cast<const float2*>(b + d * 8);
                        c[mt][d][0] = fmaf(p0, y.x, c[mt][d][0]);
                        c[mt][d][1] = fmaf(p0, y.y, c[mt][d][1]);
                        c[mt][d][2] = fmaf(p1, y.x, c[mt][d][2]);
                        c[mt][d][3] = fmaf(p1, y.y, c[mt][d][3]);
                    }
                }
            }
        }
    }
}
#endif

// One row tile (16 rows) per warp: the backward kernels' form.
template <int NB>
__device__ __forceinline__ void gemm_nt(float (&c)[NB][4], const elem_t* A, int row0, const elem_t* B) {
    gemm_nt<1, NB>(reinterpret_cast<float(&)[1][NB][4]>(c), A, row0, B);
}
template <int NB>
__device__ __forceinline__ void gemm_nn(float (&c)[ND][4], const float (&p)[NB][4], const elem_t* B) {
    gemm_nn<1, NB>(reinterpret_cast<float(&)[1][ND][4]>(c), reinterpret_cast<const float(&)[1][NB][4]>(p), B);
}

template <int N>
__device__ __forceinline__ void zero(float (&c)[N][4]) {
#pragma unroll
    for (int j = 0; j < N; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
}
