// The element-wise work of a Llama-family layer between its products, fused: a residual add with the RMS
// norm after it, the rotary embedding of queries and keys (the keys, with the values, written into the
// paged cache in the same pass), and SiLU(gate) * up. Each is one call a
// layer where torch takes five to eight operators (and as many trips through its dispatcher), and each
// row is computed alone, by one thread, in one order: a row's result does not depend on the batch.
//
// Rounding is torch's: in bf16 every operator of the unfused forward rounds its result to bf16, and so do
// the steps here, so the rotary embedding and the products of the norm's weight give the same bits; the
// norm's sum of squares and SiLU's exponential are reduced and computed in another order (last-bit
// differences in float32 before the rounding). Built with `paged_attention.cpp` into one library by
// `engine/native.py`.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "bf16.h"

namespace {

using llmos::put;
using llmos::to_bf16;
using llmos::to_float;

// A value as the unfused forward holds it after an operator: rounded to the storage type.
inline float held(float v, float*) { return v; }
inline float held(float v, uint16_t*) { return to_float(to_bf16(v)); }

// Rows are shared among threads only past this many elements a call (a decode step's few rows are
// quicker on one than waking a second). From 32k (SmolLM2: SiLU from 22 rows, the rotary embedding from
// 35, the norms from 57): a 64-row decode step alone 0.955x the time; served at 64 streams through the
// gateway, five restarts each, alternating, 1,519 → 1,558 tok/s (at 16k, which shares 16-row steps too,
// served runs lost).
constexpr int64_t PARALLEL_ELEMENTS = 1 << 15;

// x += add (when given, in x's type), then out = weight * (x / rms(x)), the norm in float32.
template <typename T>
void add_rms_norm(T* x, const T* add, const T* weight, T* out, int64_t rows, int64_t hidden, float eps) {
#pragma omp parallel for schedule(static) if (rows * hidden > PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; ++r) {
        T* row = x + r * hidden;
        if (add) {
            const T* a = add + r * hidden;
#pragma omp simd
            for (int64_t i = 0; i < hidden; ++i) put(row + i, to_float(row[i]) + to_float(a[i]));
        }
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < hidden; ++i) {
            const float v = to_float(row[i]);
            squares += v * v;
        }
        const float scale = 1.0f / std::sqrt(squares / static_cast<float>(hidden) + eps);
        T* o = out + r * hidden;
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i)
            put(o + i, to_float(weight[i]) * held(to_float(row[i]) * scale, static_cast<T*>(nullptr)));
    }
}

// o = x * cos + rotate_half(x) * sin for one head of size d at `in`.
template <typename T>
inline void rotate_head(const T* in, const T* c, const T* s, T* o, int64_t d) {
    const int64_t half = d / 2;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
        const float a = held(to_float(in[i]) * to_float(c[i]), static_cast<T*>(nullptr));
        const float b = held(-to_float(in[i + half]) * to_float(s[i]), static_cast<T*>(nullptr));
        put(o + i, a + b);
    }
#pragma omp simd
    for (int64_t i = half; i < d; ++i) {
        const float a = held(to_float(in[i]) * to_float(c[i]), static_cast<T*>(nullptr));
        const float b = held(to_float(in[i - half]) * to_float(s[i]), static_cast<T*>(nullptr));
        put(o + i, a + b);
    }
}

// Each row of x (rows `stride` elements apart) holds hq query heads, hk key heads (size d) and hk value
// heads (size dv). The query heads' rotary embedding at the row's position goes to q_out [rows, hq, d];
// the key heads' goes straight into the cache, with the value heads as they are, at the row's slot:
// keys [hk, slots_per_head, d] and values [hk, slots_per_head, dv] (the pool's blocks of positions, flat).
template <typename T>
void rotary_store(const T* x, int64_t stride, const T* cos, const T* sin, const int64_t* positions,
                  const int64_t* slots, T* q_out, T* keys, T* values, int64_t rows, int64_t hq, int64_t hk, int64_t d,
                  int64_t dv, int64_t slots_per_head) {
#pragma omp parallel for schedule(static) if (rows * (hq + 2 * hk) * d > PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; ++r) {
        const T* c = cos + positions[r] * d;
        const T* s = sin + positions[r] * d;
        const T* row = x + r * stride;
        for (int64_t h = 0; h < hq; ++h) rotate_head(row + h * d, c, s, q_out + (r * hq + h) * d, d);
        for (int64_t h = 0; h < hk; ++h) {
            rotate_head(row + (hq + h) * d, c, s, keys + (h * slots_per_head + slots[r]) * d, d);
            std::memcpy(values + (h * slots_per_head + slots[r]) * dv, row + (hq + hk) * d + h * dv, dv * sizeof(T));
        }
    }
}

// out = SiLU(gate) * up, gate and up the two halves of each row of gate_up [rows, 2 * inner].
template <typename T>
void silu_mul(const T* gate_up, T* out, int64_t rows, int64_t inner) {
#pragma omp parallel for schedule(static) if (rows * inner > PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; ++r) {
        const T* g = gate_up + r * 2 * inner;
        const T* u = g + inner;
        T* o = out + r * inner;
#pragma omp simd
        for (int64_t i = 0; i < inner; ++i) {
            const float v = to_float(g[i]);
            const float silu = held(v / (1.0f + std::exp(-v)), static_cast<T*>(nullptr));
            put(o + i, silu * to_float(u[i]));
        }
    }
}

}  // namespace

extern "C" {

void llmos_add_rms_norm_bf16(uint16_t* x, const uint16_t* add, const uint16_t* weight, uint16_t* out, int64_t rows,
                             int64_t hidden, float eps) {
    add_rms_norm(x, add, weight, out, rows, hidden, eps);
}

void llmos_add_rms_norm_f32(float* x, const float* add, const float* weight, float* out, int64_t rows, int64_t hidden,
                            float eps) {
    add_rms_norm(x, add, weight, out, rows, hidden, eps);
}

void llmos_rotary_store_bf16(const uint16_t* x, int64_t stride, const uint16_t* cos, const uint16_t* sin,
                             const int64_t* positions, const int64_t* slots, uint16_t* q_out, uint16_t* keys,
                             uint16_t* values, int64_t rows, int64_t hq, int64_t hk, int64_t d, int64_t dv,
                             int64_t slots_per_head) {
    rotary_store(x, stride, cos, sin, positions, slots, q_out, keys, values, rows, hq, hk, d, dv, slots_per_head);
}

void llmos_rotary_store_f32(const float* x, int64_t stride, const float* cos, const float* sin,
                            const int64_t* positions, const int64_t* slots, float* q_out, float* keys, float* values,
                            int64_t rows, int64_t hq, int64_t hk, int64_t d, int64_t dv, int64_t slots_per_head) {
    rotary_store(x, stride, cos, sin, positions, slots, q_out, keys, values, rows, hq, hk, d, dv, slots_per_head);
}

void llmos_silu_mul_bf16(const uint16_t* gate_up, uint16_t* out, int64_t rows, int64_t inner) {
    silu_mul(gate_up, out, rows, inner);
}

void llmos_silu_mul_f32(const float* gate_up, float* out, int64_t rows, int64_t inner) {
    silu_mul(gate_up, out, rows, inner);
}

}
