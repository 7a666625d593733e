// The element type of a kernel build, and exact conversions to and from float.
//
//     -DELEM=0  float16     stored as u16, converted with cvt (round to nearest even)
//     -DELEM=1  bfloat16    stored as u16: the high half of a float32; rounded to nearest even
//     -DELEM=2  float32
//
// No CUDA headers: NVRTC and nvcc compile this the same way.

#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#ifndef ELEM
#error "compile with -DELEM=0 (float16), 1 (bfloat16) or 2 (float32)"
#endif

#if ELEM == 2
typedef float elem_t;
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float from_float(float x) { return x; }
#else
typedef u16 elem_t;
__device__ __forceinline__ float to_float(u16 x) {
#if ELEM == 1
    return __uint_as_float(((u32)x) << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
#endif
}
__device__ __forceinline__ u16 from_float(float x) {
    u16 r;
#if ELEM == 1
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
#endif
    return r;
}
// Two floats -> one register of two 16-bit values, `lo` in the low half (the lower column).
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
#if ELEM == 1
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}
#endif
