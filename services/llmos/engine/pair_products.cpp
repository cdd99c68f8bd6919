// The weights' bf16 products on a CPU with avx512_bf16: out [M, N] = x [M, K] times w [N, K] transposed,
// with the bits of oneDNN's prepacked bf16 kernel on such a CPU, and faster where a step's rows are few.
//
// Layout: the weight is stored in pairs (`engine/matmul.py`'s `PairedWeight`): [N / 16][K / 2][16][2],
// so one 64-byte load holds k and k + 1 of 16 output columns, as `vdpbf16ps` multiplies them. Each output
// is one float32 sum in k's order, a pair at a time, started afresh in every block of K (512 values when
// K <= 1024, else 1024) and the blocks' sums added in order: the order oneDNN's kernel keeps (verified
// bit for bit against it at load, `matmul.py`, and by the tests), rounded to bf16 to nearest even. A row's
// result depends on that row alone, so it is the same in a batch of any size.
//
// Speed: a decode step reads every weight once from memory and multiplies it by a few rows. Each thread
// takes a run of column groups; while it multiplies one group it asks for the next group's weights
// (a prefetch into L2), so the reading overlaps the arithmetic instead of following it. On SmolLM2's
// products (2 cores, weights cold as in a step): 1.4x to 1.6x oneDNN's time at 1 to 32 rows, 1.1x at 128.
//
// Built by `engine/native.py` without -ffast-math: the blocks' sums must be added in order.

#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

namespace {

// Values of K summed afresh before adding to the output's running sum, as oneDNN blocks K.
inline int64_t k_block(int64_t K) { return K <= 1024 ? 512 : 1024; }

// MR rows times NR groups of 16 columns. `w`: the first column group's pairs; `next`: the weights to ask
// for ahead (or null).
template <int MR, int NR>
inline void tile(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, uint16_t* out, int64_t ldo,
                 const uint16_t* next) {
    const int64_t group = 16 * K;       // bf16 values between one column group's pairs and the next's
    const int64_t block = k_block(K);
    alignas(64) float sum[MR][NR][16];
    for (int64_t k0 = 0; k0 < K; k0 += block) {
        const int64_t k1 = k0 + block < K ? k0 + block : K;
        __m512 acc[MR][NR];
        for (int r = 0; r < MR; ++r)
            for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
        for (int64_t kp = k0 / 2; kp < k1 / 2; ++kp) {
            __m512bh pairs[NR];
            for (int j = 0; j < NR; ++j) pairs[j] = (__m512bh)_mm512_loadu_si512(w + j * group + kp * 32);
            if (next != nullptr)
                for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(next + j * group + kp * 32),
                                                          _MM_HINT_T1);
            for (int r = 0; r < MR; ++r) {
                int32_t xs;
                std::memcpy(&xs, x + r * ldx + 2 * kp, sizeof xs);
                const __m512bh both = (__m512bh)_mm512_set1_epi32(xs);
                for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], both, pairs[j]);
            }
        }
        for (int r = 0; r < MR; ++r)
            for (int j = 0; j < NR; ++j)
                _mm512_store_ps(sum[r][j], k0 == 0 ? acc[r][j] : _mm512_add_ps(_mm512_load_ps(sum[r][j]), acc[r][j]));
    }
    for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NR; ++j)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo + j * 16),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(sum[r][j])));
}

constexpr int ROWS = 12;        // rows a tile (with NR columns groups, at most 24 accumulators)

template <int NR, int MR = 1>
inline void last_rows(int64_t left, const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, uint16_t* out,
                      int64_t ldo, const uint16_t* next) {
    if constexpr (MR < ROWS) {
        if (left == MR) return tile<MR, NR>(x, ldx, w, K, out, ldo, next);
        last_rows<NR, MR + 1>(left, x, ldx, w, K, out, ldo, next);
    }
}

// Every row times one group of NR * 16 columns; the first tile asks for `next` ahead.
template <int NR>
inline void column_group(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* w, int64_t K, uint16_t* out,
                         int64_t ldo, const uint16_t* next) {
    int64_t m = 0;
    for (; m + ROWS <= M; m += ROWS)
        tile<ROWS, NR>(x + m * ldx, ldx, w, K, out + m * ldo, ldo, m == 0 ? next : nullptr);
    if (m < M) last_rows<NR>(M - m, x + m * ldx, ldx, w, K, out + m * ldo, ldo, m == 0 ? next : nullptr);
}

template <int NR>
void product(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* w, int64_t N, int64_t K, uint16_t* out,
             int64_t ldo) {
    const int64_t blocks = N / 16, groups = blocks / NR, group = NR * 16 * K;
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups + 1; ++g) {
        if (g < groups) {
            column_group<NR>(x, M, ldx, w + g * group, K, out + g * NR * 16, ldo,
                             g + 1 < groups ? w + (g + 1) * group : nullptr);
        } else {                                        // the blocks left over, one at a time
            for (int64_t b = groups * NR; b < blocks; ++b)
                column_group<1>(x, M, ldx, w + b * 16 * K, K, out + b * 16, ldo, nullptr);
        }
    }
}

}  // namespace

extern "C" int llmos_pair_product_bf16(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* w, int64_t N,
                                       int64_t K, uint16_t* out, int64_t ldo) {
    if (N % 16 != 0 || K % 2 != 0) return 1;
    if (M <= 8) product<1>(x, M, ldx, w, N, K, out, ldo);        // few rows: more threads' work to share
    else product<2>(x, M, ldx, w, N, K, out, ldo);
    return 0;
}

#else

extern "C" int llmos_pair_product_bf16(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, uint16_t*,
                                       int64_t) {
    return 2;       // built for a CPU without avx512_bf16
}

#endif
