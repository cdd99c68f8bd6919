// Attention over the paged KV cache for each query row: a decoding sequence's newest token, or one
// token of a prompt chunk (which sees the positions up to its own: causal). Its keys and values are
// read through its sequence's block table where they lie in the pool, in float32.
//
// Each (row, KV head) is one work item, computed by one thread from start to end in a fixed order
// (where AVX-512 is, a bf16 row's scores a block of keys at a time: `score_turned`); where AVX-512 is,
// a bf16 prompt chunk's rows go up to 16 to an item instead, sharing the reads of each block
// (`attend_chunk`, with AMX's tiles where the CPU has them), each row still its own fixed sequence of
// operations. Either way a row's result depends on nothing but its own query, table and
// cache, whatever else is in the batch, however a prompt was cut into chunks and however the items are
// shared among threads.
// Built and loaded by `engine/native.py`; the layouts are those of `engine/attention.py`:
//   q       [n, hq, d]              (bf16 or float32, contiguous)
//   keys    [hk, pool, BLOCK, d]    values [hk, pool, BLOCK, dv]
//   tables  [sequences, width]      block ids; which [n]: each row's sequence (its table's row)
//   seen    [n]                     positions the row sees the end of (its own position + 1)
//   out     [n, hq, dv]             in q's dtype
// A row sees positions [seen - window, seen) (all of [0, seen) without a window). Rows from `rounded_from`
// on (a bf16 prompt's) weigh the values as flash attention does in bf16: each weight exp(s - max)
// rounded to bf16, their float32 sum dividing the weighed values at the end; the others divide the
// weights first and keep them in float32.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bf16.h"

extern "C" int llmos_pair_product_kind_bf16(int64_t K);     // pair_products.cpp, the same library

namespace {

using llmos::put;
using llmos::to_float;

constexpr int64_t BLOCK = 16;

thread_local std::vector<float> scratch;    // each thread's scores, reused call after call

// Asks for block b of a row's table (16 positions of one head: 2 KiB in bf16 at size 64). Blocks lie
// anywhere in the pool, so the hardware's own prefetching stops at each block's end, and in a step the
// weights' products have pushed the cache out of every level: without asking, each block's first lines
// cost a trip to memory, one after another.
template <typename T>
inline void prefetch_block(const T* pool, const int64_t* table, int64_t b, int64_t width) {
    const char* block = reinterpret_cast<const char*>(pool + table[b] * BLOCK * width);
    for (int64_t offset = 0; offset < BLOCK * width * static_cast<int64_t>(sizeof(T)); offset += 64)
        __builtin_prefetch(block + offset);
}

// The block after position p's, when p starts a block and the row reads that one too.
template <typename T>
inline void prefetch_next(const T* pool, const int64_t* table, int64_t p, int64_t end, int64_t width) {
    const int64_t next = p / BLOCK + 1;
    if (p % BLOCK == 0 && next * BLOCK < end) prefetch_block(pool, table, next, width);
}

// Key blocks asked for before an item's first score, and kept that far ahead after, so that many reads
// are in flight at once; asking one block ahead only, reads waited on memory one block after another
// (decode attention at 64 rows of 100 positions, SmolLM2's heads, cold: 8.2 -> 5.5 ms, 500 positions
// 36 -> 27.5 ms; the same results bit for bit).
constexpr int64_t KEYS_AHEAD = 32;

#if defined(__AVX512F__)
// A 16 x 16 matrix of 32-bit elements transposed in registers: r[i] holds row i; on return r[j] holds column j.
inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int k = 0; k < 4; ++k) {
            t[i + k] = _mm512_shuffle_i32x4(r[i + k], r[i + k + 4], 0x88);
            t[i + k + 4] = _mm512_shuffle_i32x4(r[i + k], r[i + k + 4], 0xdd);
        }
    for (int k = 0; k < 8; ++k) {
        r[k] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0x88);
        r[k + 8] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0xdd);
    }
}

// A block's keys turned, 32 of their D dimensions from `half`: pairs[i] holds dimensions half + 2i and
// half + 2i + 1 of each of the block's 16 positions (lane p: position p's two bf16).
template <int D>
inline void turn(const uint16_t* block, int half, __m512i pairs[BLOCK]) {
    for (int p = 0; p < BLOCK; ++p) pairs[p] = _mm512_loadu_si512(reinterpret_cast<const void*>(block + p * D + half));
    transpose16(pairs);
}

// A decoding row's scores for one KV head, a block of 16 positions at a time (where AVX-512 is): the block's
// keys turned once (`turn`) and converted to float32, each of the G query heads' 16 scores a vector of
// fused multiply-adds: dimensions 0, 2, 4, ... in order in one sum and 1, 3, 5, ... in another, the two added
// and times the scaling. Where each key was converted and summed across a vector for every score, this reads
// the block once for the group's heads and sums nothing across lanes. Positions in the first and last blocks
// that the row does not see are computed in their own lanes and never stored. scores[j * length + p - start].
template <int G, int D>
void score_turned(const float* query, const uint16_t* head_keys, const uint16_t* head_values, const int64_t* table,
                  int64_t start, int64_t end, float* scores, int64_t length, float scaling) {
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    const int64_t first = start / BLOCK, last = (end - 1) / BLOCK;
    for (int64_t b = first; b <= std::min(last, first + KEYS_AHEAD - 1); ++b) prefetch_block(head_keys, table, b, D);
    for (int64_t b = first; b <= last; ++b) {
        if (b + KEYS_AHEAD <= last) prefetch_block(head_keys, table, b + KEYS_AHEAD, D);
        prefetch_block(head_values, table, b, D);       // a block's values are asked for as its keys are read
        const uint16_t* block = head_keys + table[b] * BLOCK * D;
        __m512 even[G], odd[G];
        for (int j = 0; j < G; ++j) even[j] = odd[j] = _mm512_setzero_ps();
        for (int half = 0; half < D; half += 32) {         // 32 dimensions: 16 pairs of each position
            __m512i pairs[BLOCK];
            turn<D>(block, half, pairs);
            for (int i = 0; i < 16; ++i) {
                const int t = half + 2 * i;
                const __m512 low_keys = _mm512_castsi512_ps(_mm512_slli_epi32(pairs[i], 16));
                const __m512 high_keys = _mm512_castsi512_ps(_mm512_and_si512(pairs[i], high));
                for (int j = 0; j < G; ++j) {
                    even[j] = _mm512_fmadd_ps(_mm512_set1_ps(query[j * D + t]), low_keys, even[j]);
                    odd[j] = _mm512_fmadd_ps(_mm512_set1_ps(query[j * D + t + 1]), high_keys, odd[j]);
                }
            }
        }
        const int64_t p0 = b * BLOCK;
        const __mmask16 sees = static_cast<__mmask16>(
            ((1u << std::min<int64_t>(BLOCK, end - p0)) - 1) & ~((1u << std::max<int64_t>(0, start - p0)) - 1));
        for (int j = 0; j < G; ++j)         // (lanes before `start` are masked: never written below the row)
            _mm512_mask_storeu_ps(scores + j * length + (p0 - start), sees,
                                  _mm512_mul_ps(_mm512_add_ps(even[j], odd[j]), _mm512_set1_ps(scaling)));
    }
}
#endif

// A row's scores for one KV head, a position at a time: its key converted to float32 (in `row`), then each
// query head's products summed across a vector (in the order the compiler's reduction takes).
// scores[j * length + p - start].
template <typename T, int G, int D>
void score_each(const float* query, float* row, const T* head_keys, const T* head_values, const int64_t* table,
                int64_t start, int64_t end, float* scores, int64_t g_, int64_t d_, int64_t dv_, float scaling,
                float softcap) {
    const int64_t g = G ? G : g_, d = D ? D : d_, dv = D ? D : dv_;
    const int64_t length = end - start, first = start / BLOCK, last = (end - 1) / BLOCK;
    for (int64_t b = first; b <= std::min(last, first + KEYS_AHEAD - 1); ++b) prefetch_block(head_keys, table, b, d);
    for (int64_t p = start; p < end; ++p) {
        if (p == start || p % BLOCK == 0) {     // a block's values are asked for as its keys are read
            const int64_t b = p / BLOCK;
            if (b + KEYS_AHEAD <= last) prefetch_block(head_keys, table, b + KEYS_AHEAD, d);
            prefetch_block(head_values, table, b, dv);
        }
        // The next block again, though asked for above: measured quicker than without (5.0-6.8 against
        // 6.8-7.2 ms in the case above), as if some of the early requests were dropped.
        prefetch_next(head_keys, table, p, end, d);
        const T* key = head_keys + (table[p / BLOCK] * BLOCK + p % BLOCK) * d;
#pragma omp simd
        for (int64_t t = 0; t < d; ++t) row[t] = to_float(key[t]);
        for (int64_t j = 0; j < g; ++j) {
            const float* q = query + j * d;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t t = 0; t < d; ++t) dot += q[t] * row[t];
            float s = dot * scaling;
            if (softcap > 0.0f) s = std::tanh(s / softcap) * softcap;
            scores[j * length + (p - start)] = s;
        }
    }
}

// One (sequence, KV head): the scores of its `g` query heads against every position it sees, their
// softmax, then the probabilities times the values. G and D are the group and head sizes where they
// are known at compile time (0: given at run time); known, the compiler keeps the queries and the
// sums in vector registers.
template <typename T, int G, int D>
void attend_item(const T* q, const T* head_keys, const T* head_values, const int64_t* table, int64_t start,
                 int64_t end, T* out, int64_t g_, int64_t d_, int64_t dv_, float scaling, float softcap, bool rounded) {
    const int64_t g = G ? G : g_, d = D ? D : d_, dv = D ? D : dv_;
    const int64_t length = end - start;
    // (BLOCK floats ahead of the scores: `score_turned` addresses the lanes of a first block before `start`)
    if (static_cast<int64_t>(scratch.size()) < BLOCK + g * length) scratch.resize(BLOCK + g * length);
    float* scores = scratch.data() + BLOCK;
    thread_local std::vector<float> totals;
    if (static_cast<int64_t>(totals.size()) < g) totals.resize(g);
    // Known sizes: arrays the compiler can keep in registers. Others: each thread's buffers.
    constexpr int64_t QN = G && D ? G * D : 1, RN = D ? D : 1;
    float fixed_query[QN], fixed_acc[QN], fixed_row[RN];
    thread_local std::vector<float> any_query, any_acc, any_row;
    if (!(G && D)) {
        any_query.resize(g * d);
        any_acc.resize(g * dv);
        any_row.resize(std::max(d, dv));
    }
    float* query_ = G && D ? fixed_query : any_query.data();
    float* acc_ = G && D ? fixed_acc : any_acc.data();
    float* row = D ? fixed_row : any_row.data();
    auto query = [&](int64_t j) { return query_ + j * d; };
    auto acc = [&](int64_t j) { return acc_ + j * dv; };
    for (int64_t j = 0; j < g; ++j) {
        for (int64_t t = 0; t < d; ++t) query(j)[t] = to_float(q[j * d + t]);
        for (int64_t t = 0; t < dv; ++t) acc(j)[t] = 0.0f;
    }
#if defined(__AVX512F__)
    constexpr bool turned = std::is_same_v<T, uint16_t> && G > 0 && (D == 64 || D == 128);
#else
    constexpr bool turned = false;
#endif
    if constexpr (turned) {
#if defined(__AVX512F__)
        score_turned<G, D>(query_, head_keys, head_values, table, start, end, scores, length, scaling);
        if (softcap > 0.0f)
            for (int64_t u = 0; u < g * length; ++u) scores[u] = std::tanh(scores[u] / softcap) * softcap;
#endif
    } else {
        score_each<T, G, D>(query_, row, head_keys, head_values, table, start, end, scores, g, d, dv, scaling,
                            softcap);
    }
    for (int64_t j = 0; j < g; ++j) {     // softmax over the positions seen
        float* s = scores + j * length;
        float top = s[0];
        for (int64_t p = 1; p < length; ++p) top = std::max(top, s[p]);
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t p = 0; p < length; ++p) {
            s[p] = std::exp(s[p] - top);
            total += s[p];
        }
        if (rounded) {          // as flash attention: the weights, unnormalized, to bf16; the sum of them not
#pragma omp simd
            for (int64_t p = 0; p < length; ++p) s[p] = to_float(llmos::to_bf16(s[p]));
            totals[j] = total;
            continue;
        }
        const float inverse = 1.0f / total;
#pragma omp simd
        for (int64_t p = 0; p < length; ++p) s[p] *= inverse;
    }
    for (int64_t p = start; p < end; ++p) {
        prefetch_next(head_values, table, p, end, dv);
        const T* value = head_values + (table[p / BLOCK] * BLOCK + p % BLOCK) * dv;
#pragma omp simd
        for (int64_t t = 0; t < dv; ++t) row[t] = to_float(value[t]);
        for (int64_t j = 0; j < g; ++j) {
            const float w = scores[j * length + (p - start)];
#pragma omp simd
            for (int64_t t = 0; t < dv; ++t) acc(j)[t] += w * row[t];
        }
    }
    for (int64_t j = 0; j < g; ++j) {
        const float scale = rounded ? 1.0f / totals[j] : 1.0f;
        for (int64_t t = 0; t < dv; ++t) put(out + j * dv + t, rounded ? acc(j)[t] * scale : acc(j)[t]);
    }
}

#if defined(__AVX512F__)
// A bf16 prompt chunk's rows, several at a time (where AVX-512 is): up to CHUNK_ROWS consecutive rows of one
// sequence and one KV head share each block of keys and values they read, converted to float32 once (the
// keys turned so that a vector holds one dimension of the block's 16 positions), where the row-at-a-time
// items above read and convert them again for every row. Every row is still its own sequence of operations:
//   score(p) = sum over t in order of q[t] * k[p][t] (fused multiply-adds), times the scaling;
//   its weights exp(score - max) over the positions it sees, rounded to bf16 as flash attention rounds them,
//   and their float32 sum, lane p % 16 summed over blocks in order, the 16 lanes then in a fixed order;
//   the values weighed over its positions in order, divided by the sum at the end.
// With AMX (and Linux's leave to use its tiles), the scores and the weighed values are tile products instead:
//   score(p) = the tile product of q and k[p] over D, 32 dimensions a product (bf16 products, float sums in
//   the order AMX sums them), times the scaling; the weighed values the tile products of the weights (bf16,
//   as rounded) and the values over 32 positions at a time from a multiple of 32, in order.
// None of it depends on which rows share the work, so a row's bits are the same however its prompt was cut
// into chunks and whatever else the step holds (positions outside a row's sight weigh nothing and are
// never added). They differ from the row-at-a-time path's, which decoding rows keep, and between a CPU
// with AMX and one without.
constexpr int64_t CHUNK_ROWS = 16;
constexpr int QUERIES = 8;        // query vectors scored together (accumulators in registers)

// Each float rounded to bf16 (to nearest even, as `llmos::to_bf16` rounds a finite float) and back.
inline __m512 rounded_to_bf16(__m512 x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i sum = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    return _mm512_castsi512_ps(_mm512_and_si512(sum, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

// A run of a prompt chunk's rows for one KV head: its query vectors (row r, head j at r * g + j), the positions
// each row sees, and the whole blocks that cover them (`base` the first position of the first).
struct Chunk {
    const uint16_t* q;
    const uint16_t* keys;
    const uint16_t* values;
    const int64_t* table;
    const int64_t* seen;
    int64_t rows, hq, g, window;
    int64_t vectors, lowest, highest, base, span;      // positions [lowest, highest) seen by some row

    Chunk(const uint16_t* q_, const uint16_t* keys_, const uint16_t* values_, const int64_t* table_,
          const int64_t* seen_, int64_t rows_, int64_t hq_, int64_t g_, int64_t window_)
        : q(q_), keys(keys_), values(values_), table(table_), seen(seen_), rows(rows_), hq(hq_), g(g_),
          window(window_), vectors(rows_ * g_), lowest(INT64_MAX), highest(0) {
        for (int64_t r = 0; r < rows; ++r) {
            lowest = std::min(lowest, start(r));
            highest = std::max(highest, seen[r]);
        }
        base = lowest / BLOCK * BLOCK;
        span = ((highest - 1) / BLOCK + 1) * BLOCK - base;
    }
    int64_t start(int64_t r) const { return window > 0 ? std::max<int64_t>(0, seen[r] - window) : 0; }
};

struct ChunkScratch {
    std::vector<float> query, scores, acc, keys, values, totals;     // scores [query vectors][span], by position
    std::vector<uint16_t> query_bf16;       // with AMX: the query vectors as they came, 16 to a tile
    std::vector<uint32_t> pairs;            // with AMX: a block's keys turned, [D / 2][16] pairs of dimensions
    std::vector<uint16_t> weights_bf16;     // with AMX: the weights, [16s of query vectors][positions from a 32]
    std::vector<uint16_t> value_pairs;      // with AMX: values in pairs of positions, [32 positions][D / 16][16][32]
};
thread_local ChunkScratch chunk_scratch;

template <typename V>
void at_least(std::vector<V>& buffer, int64_t size) {
    if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
}

// Scores by vector multiply-adds: a block's keys turned to float32 ([D][16]), QUERIES query vectors at a time
// (the last group padded with zero vectors, whose scores land in rows no one reads).
template <int D>
void score_by_vectors(const Chunk& c, ChunkScratch& s, float scaling) {
    const int64_t padded = (c.vectors + QUERIES - 1) / QUERIES * QUERIES;
    at_least(s.query, padded * D);
    at_least(s.scores, padded * c.span);
    at_least(s.keys, D * BLOCK);
    for (int64_t r = 0; r < c.rows; ++r)
        for (int64_t j = 0; j < c.g; ++j)
            for (int64_t t = 0; t < D; ++t) s.query[(r * c.g + j) * D + t] = to_float(c.q[(r * c.hq + j) * D + t]);
    std::fill(s.query.begin() + c.vectors * D, s.query.begin() + padded * D, 0.0f);
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    float* turned = s.keys.data();                        // [D][16]: dimension t of the block's positions
    for (int64_t column = 0; column < c.span; column += BLOCK) {
        const uint16_t* block = c.keys + c.table[(c.base + column) / BLOCK] * BLOCK * D;
        for (int half = 0; half < D; half += 32) {         // 32 dimensions: 16 pairs of each position
            __m512i pairs[BLOCK];
            turn<D>(block, half, pairs);
            for (int i = 0; i < 16; ++i) {
                const int t = half + 2 * i;
                _mm512_storeu_ps(turned + t * 16, _mm512_castsi512_ps(_mm512_slli_epi32(pairs[i], 16)));
                _mm512_storeu_ps(turned + (t + 1) * 16, _mm512_castsi512_ps(_mm512_and_si512(pairs[i], high)));
            }
        }
        for (int64_t u0 = 0; u0 < padded; u0 += QUERIES) {
            __m512 sums[QUERIES];
            for (int v = 0; v < QUERIES; ++v) sums[v] = _mm512_setzero_ps();
            const float* query = s.query.data() + u0 * D;
            for (int t = 0; t < D; ++t) {
                const __m512 k = _mm512_loadu_ps(turned + t * 16);
                for (int v = 0; v < QUERIES; ++v)
                    sums[v] = _mm512_fmadd_ps(_mm512_set1_ps(query[v * D + t]), k, sums[v]);
            }
            for (int v = 0; v < QUERIES; ++v)
                _mm512_storeu_ps(s.scores.data() + (u0 + v) * c.span + column,
                                 _mm512_mul_ps(sums[v], _mm512_set1_ps(scaling)));
        }
    }
}

// Each query vector's weights over the positions its row sees (rounded to bf16, in place of its scores; zero
// elsewhere in its blocks), and their float32 sum.
void weigh(const Chunk& c, ChunkScratch& s, float softcap) {
    at_least(s.totals, c.vectors);
    for (int64_t u = 0; u < c.vectors; ++u) {
        const int64_t r = u / c.g, start = c.start(r), end = c.seen[r];
        float* row = s.scores.data() + u * c.span;         // position p at row[p - c.base]
        if (softcap > 0.0f)
            for (int64_t p = start; p < end; ++p) row[p - c.base] = std::tanh(row[p - c.base] / softcap) * softcap;
        float top = row[start - c.base];
        for (int64_t p = start + 1; p < end; ++p) top = std::max(top, row[p - c.base]);
        __m512 lanes = _mm512_setzero_ps();
        for (int64_t p0 = start / BLOCK * BLOCK; p0 < end; p0 += BLOCK) {
            const __mmask16 sees = static_cast<__mmask16>(
                ((1u << std::min<int64_t>(BLOCK, end - p0)) - 1) & ~((1u << std::max<int64_t>(0, start - p0)) - 1));
            alignas(64) float weights[BLOCK];
            const __m512 scores = _mm512_loadu_ps(row + p0 - c.base);
            _mm512_store_ps(weights, _mm512_maskz_sub_ps(sees, scores, _mm512_set1_ps(top)));
#pragma omp simd
            for (int l = 0; l < BLOCK; ++l) weights[l] = std::exp(weights[l]);
            const __m512 e = _mm512_maskz_mov_ps(sees, _mm512_load_ps(weights));
            lanes = _mm512_add_ps(lanes, e);
            _mm512_storeu_ps(row + p0 - c.base, rounded_to_bf16(e));
        }
        s.totals[u] = _mm512_reduce_add_ps(lanes);
    }
}

// The values weighed by vector multiply-adds, a block at a time (converted to float32 once), each row's heads
// together, over the row's own positions in order.
template <int D>
void values_by_vectors(const Chunk& c, ChunkScratch& s) {
    constexpr int V = D / 16;
    constexpr int HEADS = 16 / V;                        // a row's heads weighed together (16 accumulators)
    at_least(s.acc, c.vectors * D);
    at_least(s.values, BLOCK * D);
    std::fill(s.acc.begin(), s.acc.begin() + c.vectors * D, 0.0f);
    float* values = s.values.data();
    for (int64_t p0 = c.base; p0 < c.base + c.span; p0 += BLOCK) {
        const uint16_t* block = c.values + c.table[p0 / BLOCK] * BLOCK * D;
        for (int64_t i = 0; i < BLOCK * D; i += 16)
            _mm512_storeu_ps(values + i, _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + i))), 16)));
        for (int64_t r = 0; r < c.rows; ++r) {
            const int64_t from = std::max(p0, c.start(r)), to = std::min(p0 + BLOCK, c.seen[r]);
            if (from >= to) continue;
            for (int64_t j0 = 0; j0 < c.g; j0 += HEADS) {        // up to HEADS of the row's heads at once
                const int heads = static_cast<int>(std::min<int64_t>(HEADS, c.g - j0));
                const float* weights[HEADS];
                float* acc[HEADS];
                __m512 sums[HEADS][V];
                for (int h = 0; h < HEADS; ++h) {
                    const int64_t u = r * c.g + j0 + std::min(h, heads - 1);
                    weights[h] = s.scores.data() + u * c.span;      // position p at weights[h][p - c.base]
                    acc[h] = s.acc.data() + u * D;
                    for (int v = 0; v < V; ++v) sums[h][v] = _mm512_loadu_ps(acc[h] + v * 16);
                }
                for (int64_t p = from; p < to; ++p) {
                    const float* value = values + (p - p0) * D;
                    for (int v = 0; v < V; ++v) {
                        const __m512 x = _mm512_loadu_ps(value + v * 16);
                        for (int h = 0; h < HEADS; ++h)
                            if (h < heads)
                                sums[h][v] = _mm512_fmadd_ps(_mm512_set1_ps(weights[h][p - c.base]), x, sums[h][v]);
                    }
                }
                for (int h = 0; h < heads; ++h)
                    for (int v = 0; v < V; ++v) _mm512_storeu_ps(acc[h] + v * 16, sums[h][v]);
            }
        }
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// Whether AMX's tiles take the rows (`pair_products.cpp` asks Linux for them once a process).
inline bool by_tiles() {
    static const bool allowed = llmos_pair_product_kind_bf16(64) == 2;
    return allowed;
}

// Palette 1, six tiles of 16 rows of 64 bytes. Scoring: tile 0 the scores of 16 query vectors at 16
// positions (floats), 1 the query vectors' next 32 dimensions (bf16), 2 the block's keys for those dimensions
// in pairs (16 pairs x 16 positions). Weighing: tiles 0-3 the sums of 16 query vectors in 4 x 16 dimensions
// (floats), 4 their weights at 32 positions (bf16), 5 the values of those positions for 16 dimensions, in
// pairs of positions.
struct alignas(64) ChunkTiles {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {64, 64, 64, 64, 64, 64};
    uint8_t rows[16] = {16, 16, 16, 16, 16, 16};
};

// Scores by AMX's tiles: each the tile product of its query vector and position over D, 32 dimensions a
// product (bf16 products, float sums, in the order AMX sums them), then times the scaling. Query vectors
// padded with zero vectors to a multiple of 16.
template <int D>
void score_by_tiles(const Chunk& c, ChunkScratch& s, float scaling) {
    const int64_t tiled = (c.vectors + 15) / 16 * 16;
    at_least(s.query_bf16, tiled * D);
    at_least(s.scores, tiled * c.span);
    at_least(s.pairs, D / 2 * 16);
    for (int64_t r = 0; r < c.rows; ++r)
        for (int64_t j = 0; j < c.g; ++j)
            std::memcpy(s.query_bf16.data() + (r * c.g + j) * D, c.q + (r * c.hq + j) * D, D * sizeof(uint16_t));
    std::fill(s.query_bf16.begin() + c.vectors * D, s.query_bf16.begin() + tiled * D, uint16_t{0});
    ChunkTiles config;
    _tile_loadconfig(&config);
    for (int64_t column = 0; column < c.span; column += BLOCK) {
        const uint16_t* block = c.keys + c.table[(c.base + column) / BLOCK] * BLOCK * D;
        for (int half = 0; half < D; half += 32) {
            __m512i pairs[BLOCK];
            turn<D>(block, half, pairs);
            for (int i = 0; i < 16; ++i) _mm512_storeu_si512(s.pairs.data() + (half / 2 + i) * 16, pairs[i]);
        }
        for (int64_t u0 = 0; u0 < tiled; u0 += 16) {
            _tile_zero(0);
            for (int half = 0; half < D; half += 32) {
                _tile_loadd(1, s.query_bf16.data() + u0 * D + half, D * sizeof(uint16_t));
                _tile_loadd(2, s.pairs.data() + half / 2 * 16, 64);
                _tile_dpbf16ps(0, 1, 2);
            }
            float* target = s.scores.data() + u0 * c.span + column;
            _tile_stored(0, target, c.span * sizeof(float));
            for (int v = 0; v < 16; ++v)
                _mm512_storeu_ps(target + v * c.span,
                                 _mm512_mul_ps(_mm512_loadu_ps(target + v * c.span), _mm512_set1_ps(scaling)));
        }
    }
    _tile_release();
}

// The values weighed by AMX's tiles over 32 positions at a time from a multiple of 32 (the weights, rounded to
// bf16 already, are bf16 exactly): a row's sums go over the same 32s in order whichever rows share the tile
// (32s before its first position add zeros), and positions outside every row's sight are zeros in both
// operands, whatever the pool holds there.
template <int D>
void values_by_tiles(const Chunk& c, ChunkScratch& s) {
    const int64_t tiled = (c.vectors + 15) / 16 * 16;
    const int64_t from = c.lowest / 32 * 32, width = (c.highest - from + 31) / 32 * 32;
    at_least(s.weights_bf16, tiled * width);
    at_least(s.value_pairs, width * D);
    at_least(s.acc, tiled * D);
    std::fill(s.weights_bf16.begin(), s.weights_bf16.begin() + tiled * width, uint16_t{0});
    for (int64_t u = 0; u < c.vectors; ++u) {
        const int64_t r = u / c.g;
        const float* row = s.scores.data() + u * c.span;
        uint16_t* target = s.weights_bf16.data() + u * width;
        for (int64_t p = c.start(r); p < c.seen[r]; ++p) {           // bf16 already: its upper half
            uint32_t bits;
            std::memcpy(&bits, row + p - c.base, sizeof bits);
            target[p - from] = static_cast<uint16_t>(bits >> 16);
        }
    }
    // Values: for each 32 positions and each 16 dimensions, 16 rows of (position 2i, 2i + 1) pairs.
    const __m512i low_half = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                              39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i high_half = _mm512_add_epi16(low_half, _mm512_set1_epi16(16));
    for (int64_t p = from; p < from + width; p += 2) {
        for (int half = 0; half < D; half += 32) {
            __m512i rows_of[2];
            for (int e = 0; e < 2; ++e) {
                const int64_t position = p + e;
                rows_of[e] = position >= c.lowest && position < c.highest
                    ? _mm512_loadu_si512(reinterpret_cast<const void*>(
                          c.values + (c.table[position / BLOCK] * BLOCK + position % BLOCK) * D + half))
                    : _mm512_setzero_si512();
            }
            const int64_t chunk = (p - from) / 32, pair = (p - from) % 32 / 2;
            uint16_t* target = s.value_pairs.data() + ((chunk * (D / 16) + half / 16) * 16 + pair) * 32;
            _mm512_storeu_si512(target, _mm512_permutex2var_epi16(rows_of[0], low_half, rows_of[1]));
            _mm512_storeu_si512(target + 16 * 32, _mm512_permutex2var_epi16(rows_of[0], high_half, rows_of[1]));
        }
    }
    ChunkTiles config;
    _tile_loadconfig(&config);
    for (int64_t u0 = 0; u0 < tiled; u0 += 16)
        for (int dims = 0; dims < D; dims += 64) {        // 4 groups of 16 dimensions at a time
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t chunk = 0; chunk < width / 32; ++chunk) {
                _tile_loadd(4, s.weights_bf16.data() + u0 * width + chunk * 32, width * sizeof(uint16_t));
                const uint16_t* pairs = s.value_pairs.data() + (chunk * (D / 16) + dims / 16) * 16 * 32;
                _tile_loadd(5, pairs, 64);
                _tile_dpbf16ps(0, 4, 5);
                _tile_loadd(5, pairs + 16 * 32, 64);
                _tile_dpbf16ps(1, 4, 5);
                _tile_loadd(5, pairs + 2 * 16 * 32, 64);
                _tile_dpbf16ps(2, 4, 5);
                _tile_loadd(5, pairs + 3 * 16 * 32, 64);
                _tile_dpbf16ps(3, 4, 5);
            }
            float* target = s.acc.data() + u0 * D + dims;
            _tile_stored(0, target, D * sizeof(float));
            _tile_stored(1, target + 16, D * sizeof(float));
            _tile_stored(2, target + 32, D * sizeof(float));
            _tile_stored(3, target + 48, D * sizeof(float));
        }
    _tile_release();
}
#else
inline bool by_tiles() { return false; }
#endif

template <int D>
void attend_chunk(const Chunk& c, uint16_t* out, float scaling, float softcap) {
    ChunkScratch& s = chunk_scratch;
    const bool tiles = by_tiles();
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (tiles) score_by_tiles<D>(c, s, scaling);
#endif
    if (!tiles) score_by_vectors<D>(c, s, scaling);
    weigh(c, s, softcap);
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (tiles) values_by_tiles<D>(c, s);
#endif
    if (!tiles) values_by_vectors<D>(c, s);
    for (int64_t u = 0; u < c.vectors; ++u) {
        const int64_t r = u / c.g, j = u % c.g;
        const float scale = 1.0f / s.totals[u];
        for (int64_t t = 0; t < D; ++t) out[(r * c.hq + j) * D + t] = llmos::to_bf16(s.acc[u * D + t] * scale);
    }
}
#endif

template <typename T>
using Item = void (*)(const T*, const T*, const T*, const int64_t*, int64_t, int64_t, T*, int64_t, int64_t, int64_t,
                      float, float, bool);

template <typename T, int D>
Item<T> fixed_group(int64_t g) {
    switch (g) {
        case 1: return attend_item<T, 1, D>;
        case 2: return attend_item<T, 2, D>;
        case 3: return attend_item<T, 3, D>;
        case 4: return attend_item<T, 4, D>;
        case 5: return attend_item<T, 5, D>;
        case 6: return attend_item<T, 6, D>;
        case 7: return attend_item<T, 7, D>;
        case 8: return attend_item<T, 8, D>;
        default: return nullptr;
    }
}

template <typename T>
Item<T> pick(int64_t g, int64_t d, int64_t dv) {
    Item<T> fixed = nullptr;
    if (d == dv && d == 64) fixed = fixed_group<T, 64>(g);
    if (d == dv && d == 128) fixed = fixed_group<T, 128>(g);
    return fixed ? fixed : attend_item<T, 0, 0>;
}

// Rows from `rounded_from` on that a bf16 prompt chunk's kernel takes (`attend_chunk`): runs of up to
// CHUNK_ROWS consecutive rows of one sequence, as (first row, rows). Empty where there is none.
template <typename T>
std::vector<std::pair<int64_t, int64_t>> chunk_runs(const int64_t* which, const int64_t* seen, int64_t n,
                                                    int64_t d, int64_t dv, int64_t rounded_from) {
    std::vector<std::pair<int64_t, int64_t>> runs;
#if defined(__AVX512F__)
    if (!std::is_same_v<T, uint16_t> || d != dv || (d != 64 && d != 128)) return runs;
    for (int64_t i = std::max<int64_t>(rounded_from, 0); i < n; ++i) {
        if (!runs.empty()) {
            auto& [first, rows] = runs.back();
            const int64_t last = first + rows - 1;
            if (rows < CHUNK_ROWS && which[i] == which[last] && seen[i] == seen[last] + 1) {
                ++rows;
                continue;
            }
        }
        runs.emplace_back(i, 1);
    }
#else
    (void)which, (void)seen, (void)n, (void)d, (void)dv, (void)rounded_from;
#endif
    return runs;
}

template <typename T>
int attend(const T* q, const T* keys, const T* values, const int64_t* tables, const int64_t* which,
           const int64_t* seen, T* out, int64_t n, int64_t hq, int64_t hk, int64_t d, int64_t dv, int64_t pool,
           int64_t width, float scaling, float softcap, int64_t window, int64_t rounded_from) {
    const int64_t g = hq / hk;
    const Item<T> item_fn = pick<T>(g, d, dv);
    if (!item_fn) return 1;
    const std::vector<std::pair<int64_t, int64_t>> runs = chunk_runs<T>(which, seen, n, d, dv, rounded_from);
    const int64_t single = runs.empty() ? n : rounded_from;         // rows taken one at a time
    const int64_t items = single * hk + static_cast<int64_t>(runs.size()) * hk;
    int64_t work = 0;
    for (int64_t i = 0; i < n; ++i) work += seen[i];
    // Below about 600k multiply-adds a parallel region costs what it saves (measured: one thread is as
    // fast for one sequence of 800 positions or four of 100, SmolLM2's heads; two are 1.7x at 8 of 100).
// Items dealt round robin: a prompt chunk's rows see ever more positions.
#pragma omp parallel for schedule(static, 1) if (work * hk * (d + dv) * g > 600000 && items > 1)
    for (int64_t item = 0; item < items; ++item) {
        if (item >= single * hk) {          // a run of a prompt chunk's rows
#if defined(__AVX512F__)
            if constexpr (std::is_same_v<T, uint16_t>) {
                const auto [first, rows] = runs[(item - single * hk) / hk];
                const int64_t h = (item - single * hk) % hk;
                const Chunk chunk(q + (first * hq + h * g) * d, keys + h * pool * BLOCK * d,
                                  values + h * pool * BLOCK * dv, tables + which[first] * width, seen + first, rows,
                                  hq, g, window);
                (d == 64 ? attend_chunk<64> : attend_chunk<128>)(chunk, out + (first * hq + h * g) * dv, scaling,
                                                                 softcap);
            }
#endif
            continue;
        }
        const int64_t i = item / hk, h = item % hk;
        const int64_t end = seen[i];
        const int64_t start = window > 0 ? std::max<int64_t>(0, end - window) : 0;
        T* target = out + (i * hq + h * g) * dv;
        if (end <= start) {                 // nothing to see: zeros (never so for a real sequence)
            for (int64_t t = 0; t < g * dv; ++t) put(target + t, 0.0f);
            continue;
        }
        item_fn(q + (i * hq + h * g) * d, keys + h * pool * BLOCK * d, values + h * pool * BLOCK * dv,
                tables + which[i] * width, start, end, target, g, d, dv, scaling, softcap, i >= rounded_from);
    }
    return 0;
}

}  // namespace

extern "C" {

int llmos_paged_attention_bf16(const uint16_t* q, const uint16_t* keys, const uint16_t* values,
                               const int64_t* tables, const int64_t* which, const int64_t* seen, uint16_t* out,
                               int64_t n, int64_t hq, int64_t hk, int64_t d, int64_t dv, int64_t pool, int64_t width,
                               float scaling, float softcap, int64_t window, int64_t rounded_from) {
    return attend(q, keys, values, tables, which, seen, out, n, hq, hk, d, dv, pool, width, scaling, softcap, window,
                  rounded_from);
}

int llmos_paged_attention_f32(const float* q, const float* keys, const float* values, const int64_t* tables,
                              const int64_t* which, const int64_t* seen, float* out, int64_t n, int64_t hq,
                              int64_t hk, int64_t d, int64_t dv, int64_t pool, int64_t width, float scaling,
                              float softcap, int64_t window, int64_t rounded_from) {
    return attend(q, keys, values, tables, which, seen, out, n, hq, hk, d, dv, pool, width, scaling, softcap, window,
                  rounded_from);
}

}
