// bf16 and float32 as the engine's kernels read and write them (`paged_attention.cpp`, `fused_ops.cpp`):
// a bf16 is the high half of a float32, and a float32 is stored as bf16 rounded to nearest even, as
// torch rounds (any NaN as the one quiet NaN).
#pragma once

#include <cstdint>
#include <cstring>

namespace llmos {

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {
    uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline uint16_t to_bf16(float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

inline void put(float* out, float v) { *out = v; }
inline void put(uint16_t* out, float v) { *out = to_bf16(v); }

}  // namespace llmos
