// The weights' bf16 products on a CPU with avx512_bf16: out [M, N] = x [M, K] times w [N, K] transposed.
// Two kernels over one layout, picked by the CPU the library was built on:
// - With AMX (and K a multiple of 32), AMX's tiles: each 16 x 16 block of outputs is summed by `tdpbf16ps`
//   over K in chunks of 32 values, always in K's order, on 16 rows of x at a time (the last rows padded with
//   zeros). An output is its row's own sequence of tile products whatever the other rows, so a row's result
//   is the same in a batch of any size, by construction. oneDNN's AMX kernels switch kernels by the number of
//   rows (a row's bits differ between 32 and 33 rows), which is why the engine called them in tiles of 16
//   rows, one call a tile; here one call takes every row, reading each weight once. The weights are read in
//   order, and the CPU's own prefetcher keeps ahead of them: asking for the next group's lines (as the kernel
//   below does) made the LM head 1.7x slower at one row. Above 16 rows a group's weights are multiplied in
//   passes that do not wait on memory, and there the next group's are asked for, spread over those passes.
// - Otherwise `vdpbf16ps`, with the bits of oneDNN's prepacked bf16 kernel on such a CPU (below).
//
// Layout: the weight is stored in pairs (`engine/matmul.py`'s `PairedWeight`): [N / 16][K / 2][16][2],
// so one 64-byte load holds k and k + 1 of 16 output columns, as `vdpbf16ps` multiplies them, and 16 such
// rows (1 KB) are one AMX tile of the weight, as `tdpbf16ps` takes it.
//
// vdpbf16ps, on a CPU without AMX: the bits of oneDNN's prepacked bf16 kernel there. Each output
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
#include <sys/syscall.h>
#include <unistd.h>

#include <vector>

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
    // The blocks left over (N / 16 not a multiple of NR) are one more item; none, no item: an empty one would
    // give one thread a group more than the other (SmolLM2's 576 columns: 10 against 8, the step 4% longer).
    const int64_t items = groups + (blocks % NR != 0);
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < items; ++g) {
        if (g < groups) {
            column_group<NR>(x, M, ldx, w + g * group, K, out + g * NR * 16, ldo,
                             g + 1 < groups ? w + (g + 1) * group : nullptr);
        } else {                                        // the blocks left over, one at a time
            for (int64_t b = groups * NR; b < blocks; ++b)
                column_group<1>(x, M, ldx, w + b * 16 * K, K, out + b * 16, ldo, nullptr);
        }
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// Whether this process may use AMX's tile registers: Linux hands them out on request (once a process).
bool tiles_allowed() {
    static const bool allowed = [] {
        constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
        return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }();
    return allowed;
}

// Palette 1: tiles 0-3 the outputs (16 rows of 16 floats), 4-5 rows of x (16 rows of 32 bf16), 6-7 the weights
// (16 rows of 16 pairs).
struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

void configure_tiles() {
    TileConfig config;
    for (int t = 0; t < 8; ++t) {
        config.colsb[t] = 64;
        config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
}

// The next column group's weights asked for into L2 while one group is multiplied, a few lines each step of K
// (`ahead`, `end`: the lines left to ask for; null: none).
struct Ahead {
    const char* at = nullptr;
    const char* end = nullptr;
    int64_t step = 0;           // bytes asked for each step of K

    inline void ask() {
        for (const char* stop = at + step < end ? at + step : end; at < stop; at += 64) _mm_prefetch(at, _MM_HINT_T1);
    }
};

// How far ahead along K (values) a 32-row block's x is asked for.
constexpr int64_t X_AHEAD = 64;

// 16 or 32 rows of x (`a`, rows padded to 16s) times two groups of 16 columns (`w0`, `w1`, each [K / 2][16][2]),
// over all of K in order; writes the rows below `rows` of the 16 x 32 or 32 x 32 outputs.
template <bool TWO, bool AHEAD>
inline void tile_block(const uint16_t* a, int64_t lda, const uint16_t* w0, const uint16_t* w1, int64_t K,
                       uint16_t* out, int64_t ldo, int64_t rows, int64_t cols, Ahead& ahead) {
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (TWO) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t k = 0; k < K; k += 32) {
        if constexpr (AHEAD) ahead.ask();
        if constexpr (TWO) {
            // x's 32 rows two steps of K ahead asked for into L1: a tile load's 16 lines otherwise wait on L2
            // (products alone 0.93-0.96x the time at 64 to 688 rows, the same bits)
            if (k + X_AHEAD < K)
                for (int r = 0; r < 32; ++r)
                    _mm_prefetch(reinterpret_cast<const char*>(a + r * lda + k + X_AHEAD), _MM_HINT_T0);
        }
        _tile_loadd(4, a + k, lda * 2);
        _tile_loadd(6, w0 + k * 16, 64);
        _tile_loadd(7, w1 + k * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if constexpr (TWO) {
            _tile_loadd(5, a + 16 * lda + k, lda * 2);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    alignas(64) float sums[32][32];
    _tile_stored(0, &sums[0][0], 128);
    _tile_stored(1, &sums[0][16], 128);
    if constexpr (TWO) {
        _tile_stored(2, &sums[16][0], 128);
        _tile_stored(3, &sums[16][16], 128);
    }
    for (int64_t r = 0; r < rows; ++r) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(sums[r])));
        if (cols > 16)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo + 16),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(sums[r] + 16)));
    }
}

// Rows above which a group's weights are multiplied long enough for the next group's to be asked for: at 16 rows
// or fewer the CPU's own prefetcher keeps up with the plain stream (see the top of this file).
constexpr int64_t ASK_AHEAD_ROWS = 16;

void tile_product(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* w, int64_t N, int64_t K, uint16_t* out,
                  int64_t ldo) {
    // x's rows padded with zeros to a multiple of 16 where they are not one (a padding row's outputs are
    // computed and dropped; no real row's depend on them), in a buffer the calling thread keeps: a decode
    // step pads every product.
    const int64_t padded = (M + 15) / 16 * 16;
    thread_local std::vector<uint16_t> copy;
    const uint16_t* a = x;
    int64_t lda = ldx;
    if (padded != M) {
        if (copy.size() < static_cast<size_t>(padded * K)) copy.resize(padded * K);
        for (int64_t r = 0; r < M; ++r) std::memcpy(copy.data() + r * K, x + r * ldx, K * sizeof(uint16_t));
        std::memset(copy.data() + M * K, 0, (padded - M) * K * sizeof(uint16_t));
        a = copy.data();
        lda = K;
    }
    const int64_t groups = (N / 16 + 1) / 2;        // of 32 columns (the last of 16 where N / 16 is odd)
    // With more than 16 rows a group's weights are multiplied in (padded / 32) passes over K: its first pass
    // waits on memory and the others do not. Asking for the next group's weights over all of its passes
    // keeps the memory busy while they run (products alone 1.05-1.12x at 32 to 128 rows, the same bits).
    const int64_t passes = (padded + 31) / 32, steps = passes * (K / 32);
    const int64_t step = M > ASK_AHEAD_ROWS ? (32 * K * 2 / steps + 63) / 64 * 64 : 0;
#pragma omp parallel
    {
        configure_tiles();
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t cols = N - g * 32 < 32 ? 16 : 32;
            const uint16_t* w0 = w + g * 32 * K;
            const uint16_t* w1 = cols > 16 ? w0 + 16 * K : w0;   // (an odd last group multiplies its one twice)
            Ahead ahead;
            if (step > 0 && g + 1 < groups) {
                ahead.at = reinterpret_cast<const char*>(w + (g + 1) * 32 * K);
                ahead.end = reinterpret_cast<const char*>(w + N * K);
                if (ahead.end - ahead.at > 32 * K * 2) ahead.end = ahead.at + 32 * K * 2;
                ahead.step = step;
            }
            int64_t m = 0;
            for (; m + 32 <= padded; m += 32)
                tile_block<true, true>(a + m * lda, lda, w0, w1, K, out + m * ldo + g * 32, ldo,
                                       M - m < 32 ? M - m : 32, cols, ahead);
            if (m < padded) {               // the last 16 rows (all of them at 16 rows or fewer: the plain loop)
                if (step > 0)
                    tile_block<false, true>(a + m * lda, lda, w0, w1, K, out + m * ldo + g * 32, ldo, M - m, cols,
                                            ahead);
                else
                    tile_block<false, false>(a + m * lda, lda, w0, w1, K, out + m * ldo + g * 32, ldo, M - m, cols,
                                             ahead);
            }
        }
        _tile_release();
    }
}

constexpr bool BUILT_WITH_TILES = true;
#else
bool tiles_allowed() { return false; }
void tile_product(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, uint16_t*, int64_t) {}
constexpr bool BUILT_WITH_TILES = false;
#endif

}  // namespace

extern "C" int llmos_pair_product_bf16(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* w, int64_t N,
                                       int64_t K, uint16_t* out, int64_t ldo) {
    if (N % 16 != 0 || K % 2 != 0) return 1;
    if (BUILT_WITH_TILES && K % 32 == 0 && tiles_allowed()) {
        tile_product(x, M, ldx, w, N, K, out, ldo);
        return 0;
    }
    if (M <= 8) product<1>(x, M, ldx, w, N, K, out, ldo);        // few rows: more threads' work to share
    else product<2>(x, M, ldx, w, N, K, out, ldo);
    return 0;
}

// Which kernel multiplies an [N, K] weight: 2 AMX's tiles, 1 vdpbf16ps.
extern "C" int llmos_pair_product_kind_bf16(int64_t K) {
    return BUILT_WITH_TILES && K % 32 == 0 && tiles_allowed() ? 2 : 1;
}

#else

extern "C" int llmos_pair_product_kind_bf16(int64_t) { return 0; }

extern "C" int llmos_pair_product_bf16(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, uint16_t*,
                                       int64_t) {
    return 2;       // built for a CPU without avx512_bf16
}

#endif
