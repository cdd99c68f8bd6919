// Attention over the paged KV cache, one query row at a time: a decoding sequence's newest token,
// or one token of a prompt chunk (which sees the positions up to its own: causal). Its keys and
// values are read through its sequence's block table where they lie in the pool, in float32.
//
// Each (row, KV head) is one work item, computed by one thread from start to end in a fixed order:
// a row's result depends on nothing but its own query, table and cache, whatever else is in the
// batch, however a prompt was cut into chunks and however the items are shared among threads.
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
#include <vector>

#include "bf16.h"

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

// One (sequence, KV head): the scores of its `g` query heads against every position it sees, their
// softmax, then the probabilities times the values. G and D are the group and head sizes where they
// are known at compile time (0: given at run time); known, the compiler keeps the queries and the
// sums in vector registers.
template <typename T, int G, int D>
void attend_item(const T* q, const T* head_keys, const T* head_values, const int64_t* table, int64_t start,
                 int64_t end, T* out, int64_t g_, int64_t d_, int64_t dv_, float scaling, float softcap, bool rounded) {
    const int64_t g = G ? G : g_, d = D ? D : d_, dv = D ? D : dv_;
    const int64_t length = end - start;
    if (static_cast<int64_t>(scratch.size()) < g * length) scratch.resize(g * length);
    float* scores = scratch.data();
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
    const int64_t first = start / BLOCK, last = (end - 1) / BLOCK;
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
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t t = 0; t < d; ++t) dot += query(j)[t] * row[t];
            float s = dot * scaling;
            if (softcap > 0.0f) s = std::tanh(s / softcap) * softcap;
            scores[j * length + (p - start)] = s;
        }
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

template <typename T>
int attend(const T* q, const T* keys, const T* values, const int64_t* tables, const int64_t* which,
           const int64_t* seen, T* out, int64_t n, int64_t hq, int64_t hk, int64_t d, int64_t dv, int64_t pool,
           int64_t width, float scaling, float softcap, int64_t window, int64_t rounded_from) {
    const int64_t g = hq / hk;
    const Item<T> item_fn = pick<T>(g, d, dv);
    if (!item_fn) return 1;
    const int64_t items = n * hk;
    int64_t work = 0;
    for (int64_t i = 0; i < n; ++i) work += seen[i];
    // Below about 600k multiply-adds a parallel region costs what it saves (measured: one thread is as
    // fast for one sequence of 800 positions or four of 100, SmolLM2's heads; two are 1.7x at 8 of 100).
// Items dealt round robin: a prompt chunk's rows see ever more positions.
#pragma omp parallel for schedule(static, 1) if (work * hk * (d + dv) * g > 600000 && items > 1)
    for (int64_t item = 0; item < items; ++item) {
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
