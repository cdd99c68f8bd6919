// Greedy picks: the index of each chosen row's largest logit (float32, or bf16 as the LM head gives them in
// bf16), as torch.argmax gives it (the first of equal maxima; a NaN counts as larger than any number, the
// first NaN wins). A bf16 logit is compared as the float32 it widens to, exactly, so the picks are those of
// the float32 copy the engine no longer makes (0.8 ms a step of 64 rows of a 49,152-token vocabulary).
// Rows in parallel, each read twice (its maximum, then where it first is). torch's argmax takes 2.6 ms for
// 64 rows on a Xeon with AMX (2 cores), some 9% of such a step. Built by `engine/native.py` without
// -ffast-math, so comparisons with NaN keep their meaning.

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

inline float widened(float v) { return v; }
inline float widened(uint16_t v) {              // bf16: the upper half of a float32
    const uint32_t bits = static_cast<uint32_t>(v) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}

}  // namespace

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

namespace {

// Lanes j .. j + 15 (those in `lanes`) as float32; the others -inf.
inline __m512 load16(const float* row, int64_t j, __mmask16 lanes) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), lanes, row + j);
}
inline __m512 load16(const uint16_t* row, int64_t j, __mmask16 lanes) {
    const __m256i half = _mm256_maskz_loadu_epi16(lanes, row + j);
    const __m512 wide = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    return _mm512_mask_blend_ps(lanes, _mm512_set1_ps(-INFINITY), wide);
}

template <typename T>
int64_t pick(const T* row, int64_t n) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    __mmask16 unordered = 0;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        const __m512 v = load16(row, j, 0xFFFF);
        unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        best = _mm512_max_ps(best, v);
    }
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - j)) - 1);
    if (tail) {
        const __m512 v = load16(row, j, tail);
        unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        best = _mm512_max_ps(best, v);
    }
    if (unordered) {
        for (int64_t i = 0; i < n; ++i)
            if (std::isnan(widened(row[i]))) return i;
    }
    const float top = _mm512_reduce_max_ps(best);
    const __m512 wanted = _mm512_set1_ps(top);
    for (j = 0; j + 16 <= n; j += 16) {
        const __mmask16 hit = _mm512_cmp_ps_mask(load16(row, j, 0xFFFF), wanted, _CMP_EQ_OQ);
        if (hit) return j + __builtin_ctz(hit);
    }
    for (; j < n; ++j)
        if (widened(row[j]) == top) return j;
    return 0;           // (every value -inf: the first)
}

}  // namespace

#else

namespace {

template <typename T>
int64_t pick(const T* row, int64_t n) {
    int64_t at = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (std::isnan(widened(row[i]))) return i;
        if (widened(row[i]) > widened(row[at])) at = i;
    }
    return at;
}

}  // namespace

#endif

extern "C" void llmos_greedy_picks_f32(const float* logits, int64_t ld, const int64_t* rows, int64_t count, int64_t n,
                                       int64_t* out) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; ++i) out[i] = pick(logits + rows[i] * ld, n);
}

extern "C" void llmos_greedy_picks_bf16(const uint16_t* logits, int64_t ld, const int64_t* rows, int64_t count,
                                        int64_t n, int64_t* out) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; ++i) out[i] = pick(logits + rows[i] * ld, n);
}
