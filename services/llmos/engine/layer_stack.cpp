// A Llama-family model's layers in one call, in bf16 on a CPU with avx512_bf16: for each layer the residual
// add with the RMS norm, the query/key/value product, the rotary embedding with the keys and values stored
// in the paged cache, attention, the output product, the second add and norm, the gate/up product, SiLU
// times up and the down product: the same kernels, in the same order, on the same buffers as the runner's
// Python loop calls one by one (`engine/llama.py`), so the same bits.
//
// Why: the loop makes some 270 calls a step, each of which takes the interpreter back between kernels,
// and the worker's event loop holds the interpreter for milliseconds while it sends a step's tokens; in
// one call the layers run without it, while the event loop sends. Built with the other kernels by
// `engine/native.py`.

#include <cstdint>

extern "C" {
void llmos_add_rms_norm_bf16(uint16_t* x, const uint16_t* add, const uint16_t* weight, uint16_t* out, int64_t rows,
                             int64_t hidden, float eps);
int llmos_pair_product_bf16(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* w, int64_t N, int64_t K,
                            uint16_t* out, int64_t ldo);
void llmos_rotary_store_bf16(const uint16_t* x, int64_t stride, const uint16_t* cos, const uint16_t* sin,
                             const int64_t* positions, const int64_t* slots, uint16_t* q_out, uint16_t* keys,
                             uint16_t* values, int64_t rows, int64_t hq, int64_t hk, int64_t d, int64_t dv,
                             int64_t slots_per_head);
int llmos_paged_attention_bf16(const uint16_t* q, const uint16_t* keys, const uint16_t* values,
                               const int64_t* tables, const int64_t* which, const int64_t* seen, uint16_t* out,
                               int64_t n, int64_t hq, int64_t hk, int64_t d, int64_t dv, int64_t pool, int64_t width,
                               float scaling, float softcap, int64_t window, int64_t rounded_from);
void llmos_silu_mul_bf16(const uint16_t* gate_up, uint16_t* out, int64_t rows, int64_t inner);

// Shapes: x, h, o, pending [T, hidden]; qkv [T, (hq + 2 hk) d]; q and attended [T, hq d]; gate_up [T, 2 inner];
// act [T, inner]. Weights in pairs (`pair_products.cpp`); keys and values [hk, pool, 16, d] each layer.
// On return x holds the residual stream before the last layer's down product is added, `pending` that
// product (the caller's final norm adds it). Returns 0, or the failing kernel's code.
int llmos_llama_layers_bf16(int64_t layers, int64_t T, int64_t hidden, int64_t hq, int64_t hk, int64_t d,
                            int64_t inner, float eps, float scaling, uint16_t* x, uint16_t* h, uint16_t* qkv,
                            uint16_t* q, uint16_t* attended, uint16_t* o, uint16_t* gate_up, uint16_t* act,
                            uint16_t* pending, const uint16_t* const* ln1, const uint16_t* const* wqkv,
                            const uint16_t* const* wo, const uint16_t* const* ln2, const uint16_t* const* w_gate_up,
                            const uint16_t* const* w_down, uint16_t* const* keys, uint16_t* const* values,
                            int64_t pool, const uint16_t* cos, const uint16_t* sin, const int64_t* positions,
                            const int64_t* slots, const int64_t* tables, const int64_t* which, const int64_t* seen,
                            int64_t width, int64_t rounded_from) {
    const int64_t width_qkv = (hq + 2 * hk) * d;
    for (int64_t l = 0; l < layers; ++l) {
        llmos_add_rms_norm_bf16(x, l == 0 ? nullptr : pending, ln1[l], h, T, hidden, eps);
        if (int code = llmos_pair_product_bf16(h, T, hidden, wqkv[l], width_qkv, hidden, qkv, width_qkv)) return code;
        llmos_rotary_store_bf16(qkv, width_qkv, cos, sin, positions, slots, q, keys[l], values[l], T, hq, hk, d, d,
                                pool * 16);
        if (int code = llmos_paged_attention_bf16(q, keys[l], values[l], tables, which, seen, attended, T, hq, hk, d,
                                                  d, pool, width, scaling, 0.0f, 0, rounded_from))
            return 100 + code;
        if (int code = llmos_pair_product_bf16(attended, T, hq * d, wo[l], hidden, hq * d, o, hidden)) return code;
        llmos_add_rms_norm_bf16(x, o, ln2[l], h, T, hidden, eps);
        if (int code = llmos_pair_product_bf16(h, T, hidden, w_gate_up[l], 2 * inner, hidden, gate_up, 2 * inner))
            return code;
        llmos_silu_mul_bf16(gate_up, act, T, inner);
        if (int code = llmos_pair_product_bf16(act, T, inner, w_down[l], hidden, inner, pending, hidden)) return code;
    }
    return 0;
}
}
