// Elementwise kernels of the GPU engines: element type <-> float32, and the backward's row terms.
//
// CuPy handles float16/32/64 itself; these exist so that bfloat16 (and float16, the same way) never
// depends on a library's bfloat16 support, and so that the conversions are exactly specified:
// widening is exact, narrowing rounds to nearest even (as NumPy and ml_dtypes do).

#include "elem.cuh"

// y[i] = float(x[i]), i < n
extern "C" __global__ void widen(const elem_t* __restrict__ x, float* __restrict__ y, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        y[i] = to_float(x[i]);
}

// y[i] = x[i] rounded to the element type, i < n
extern "C" __global__ void narrow(const float* __restrict__ x, elem_t* __restrict__ y, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        y[i] = from_float(x[i]);
}

// delta[b, h, i] = sum_d float(dout[b, i, h, d]) * float(out[b, i, h, d]), in float32; one warp per row.
// out, dout (B, n, H, D); delta (B, H, n). Grid: ceil(B * n * H / warps per block) blocks.
extern "C" __global__ void row_delta(const elem_t* __restrict__ out, const elem_t* __restrict__ dout,
                                     float* __restrict__ delta, int B, int n, int H, int D) {
    const i64 row = (blockIdx.x * (i64)blockDim.x + threadIdx.x) >> 5;     // (b, i, h) in memory order
    const int lane = threadIdx.x & 31;
    if (row >= (i64)B * n * H) return;
    const elem_t* o = out + row * D;
    const elem_t* g = dout + row * D;
    float s = 0.f;
    for (int d = lane; d < D; d += 32) s += to_float(o[d]) * to_float(g[d]);
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) {
        const int h = row % H, i = (row / H) % n, b = row / ((i64)H * n);
        delta[((i64)b * H + h) * n + i] = s;
    }
}
