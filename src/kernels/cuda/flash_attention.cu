// Memory-efficient ("flash") attention for f16 on NVIDIA GPUs: softmax(scale · q·kᵀ)·v without ever
// writing the n_q × n_k scores to device memory. Built by build.rs with nvcc (feature `cuda` only) and
// launched from src/attention/flash.rs.
//
// q, k, v and o are laid out as the projections produce them, (batch, tokens, heads·64), so heads are
// never split into a separate tensor or merged back: block (x, y) reads head y % heads of batch
// y / heads with a row stride of heads·64. One block = 4 warps = 64 query rows; each warp owns 16
// rows. The block walks the keys in tiles of 64: K and V tiles are staged in shared memory, S = Q·Kᵀ (16×64 per warp) comes from
// tensor cores (wmma, f16 in, f32 accumulate), then the online softmax (running row max m and sum l, in
// f32, exp2 with log2(e) folded into the scale) turns S into P (f16) and rescales the running output,
// and O += P·V on tensor cores. Keys past n_k count as −∞ (probability 0); query rows past n_q are
// computed on zeros and never written. The same arithmetic as PyTorch's fused SDPA kernels: f32 scores
// and softmax, P rounded to f16 for the second product, f32 accumulation.

#include <cuda_fp16.h>
#include <mma.h>
using namespace nvcuda;

#define HEAD_DIM 64
#define WARPS 4
#define ROWS_PER_WARP 16
#define BLOCK_ROWS (WARPS * ROWS_PER_WARP)
#define TILE_KEYS 64

extern "C" __global__ void __launch_bounds__(WARPS * 32)
flash_attention_f16_d64(const __half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
                        __half* __restrict__ o, const int n_q, const int n_k, const int heads,
                        const float scale_log2e) {
    __shared__ __align__(128) __half k_tile[TILE_KEYS * HEAD_DIM];                        // 8 KiB
    __shared__ __align__(128) __half v_tile[TILE_KEYS * HEAD_DIM];                        // 8 KiB
    __shared__ __align__(128) float scores[WARPS][ROWS_PER_WARP * TILE_KEYS];             // 16 KiB: S, then P (f16) in place
    __shared__ __align__(128) float out[WARPS][ROWS_PER_WARP * HEAD_DIM];                 // 16 KiB: Q staging, then O

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const size_t batch = blockIdx.y / heads, head = blockIdx.y % heads, stride = (size_t)heads * HEAD_DIM;
    const int first_row = blockIdx.x * BLOCK_ROWS + warp * ROWS_PER_WARP;
    const __half* q_head = q + batch * n_q * stride + head * HEAD_DIM;
    const __half* k_head = k + batch * n_k * stride + head * HEAD_DIM;
    const __half* v_head = v + batch * n_k * stride + head * HEAD_DIM;

    // This warp's 16 query rows as four 16×16 fragments, staged through its (not yet used) output buffer.
    __half* q_stage = reinterpret_cast<__half*>(out[warp]);
    for (int i = lane; i < ROWS_PER_WARP * HEAD_DIM; i += 32) {
        const int r = i / HEAD_DIM, c = i % HEAD_DIM;
        q_stage[i] = first_row + r < n_q ? q_head[(first_row + r) * stride + c] : __float2half(0.f);
    }
    __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> q_frag[HEAD_DIM / 16];
    for (int d = 0; d < HEAD_DIM / 16; ++d) wmma::load_matrix_sync(q_frag[d], q_stage + d * 16, HEAD_DIM);
    __syncwarp();
    float* o_acc = out[warp];
    for (int i = lane; i < ROWS_PER_WARP * HEAD_DIM; i += 32) o_acc[i] = 0.f;

    // Lanes 2r and 2r+1 own row r: each half of the tile's keys and half of the output columns.
    const int row = lane / 2, side = lane % 2;
    float row_max = -INFINITY, row_sum = 0.f;
    float* s = scores[warp];
    __half* p = reinterpret_cast<__half*>(s);

    for (int key0 = 0; key0 < n_k; key0 += TILE_KEYS) {
        __syncthreads();  // every warp is done with the previous K/V tiles
        for (int i = threadIdx.x; i < TILE_KEYS * HEAD_DIM / 8; i += WARPS * 32) {
            const int r = i / (HEAD_DIM / 8), c = (i % (HEAD_DIM / 8)) * 8;
            uint4 k8 = make_uint4(0, 0, 0, 0), v8 = make_uint4(0, 0, 0, 0);
            if (key0 + r < n_k) {
                k8 = *reinterpret_cast<const uint4*>(k_head + (key0 + r) * stride + c);
                v8 = *reinterpret_cast<const uint4*>(v_head + (key0 + r) * stride + c);
            }
            *reinterpret_cast<uint4*>(k_tile + r * HEAD_DIM + c) = k8;
            *reinterpret_cast<uint4*>(v_tile + r * HEAD_DIM + c) = v8;
        }
        __syncthreads();

        // S = Q·Kᵀ: Kᵀ is K read column-major.
        for (int n = 0; n < TILE_KEYS / 16; ++n) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag;
            wmma::fill_fragment(s_frag, 0.f);
            for (int d = 0; d < HEAD_DIM / 16; ++d) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> k_frag;
                wmma::load_matrix_sync(k_frag, k_tile + n * 16 * HEAD_DIM + d * 16, HEAD_DIM);
                wmma::mma_sync(s_frag, q_frag[d], k_frag, s_frag);
            }
            wmma::store_matrix_sync(s + n * 16, s_frag, TILE_KEYS, wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax of this tile, in f32.
        const int col0 = side * (TILE_KEYS / 2);
        float x[TILE_KEYS / 2];
        float tile_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < TILE_KEYS / 2; ++j) {
            x[j] = key0 + col0 + j < n_k ? s[row * TILE_KEYS + col0 + j] * scale_log2e : -INFINITY;
            tile_max = fmaxf(tile_max, x[j]);
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
        const float new_max = fmaxf(row_max, tile_max);  // finite: every tile holds at least one key
        const float rescale = exp2f(row_max - new_max);  // 0 on the first tile
        float tile_sum = 0.f;
        __syncwarp();  // every lane has read its scores before P overwrites them
#pragma unroll
        for (int j = 0; j < TILE_KEYS / 2; ++j) {
            const float e = exp2f(x[j] - new_max);
            tile_sum += e;
            p[row * TILE_KEYS + col0 + j] = __float2half(e);
        }
        tile_sum += __shfl_xor_sync(0xffffffff, tile_sum, 1);
        row_sum = row_sum * rescale + tile_sum;
        row_max = new_max;
        for (int j = 0; j < HEAD_DIM / 2; ++j) o_acc[row * HEAD_DIM + side * (HEAD_DIM / 2) + j] *= rescale;
        __syncwarp();

        // O += P·V
        for (int n = 0; n < HEAD_DIM / 16; ++n) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag;
            wmma::load_matrix_sync(o_frag, o_acc + n * 16, HEAD_DIM, wmma::mem_row_major);
            for (int kk = 0; kk < TILE_KEYS / 16; ++kk) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> p_frag;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> v_frag;
                wmma::load_matrix_sync(p_frag, p + kk * 16, TILE_KEYS);
                wmma::load_matrix_sync(v_frag, v_tile + kk * 16 * HEAD_DIM + n * 16, HEAD_DIM);
                wmma::mma_sync(o_frag, p_frag, v_frag, o_frag);
            }
            wmma::store_matrix_sync(o_acc + n * 16, o_frag, HEAD_DIM, wmma::mem_row_major);
        }
        __syncwarp();
    }

    if (first_row + row < n_q) {
        const float inv_sum = 1.f / row_sum;
        __half* o_row = o + (batch * n_q + first_row + row) * stride + head * HEAD_DIM + side * (HEAD_DIM / 2);
        for (int j = 0; j < HEAD_DIM / 2; ++j) o_row[j] = __float2half(o_acc[row * HEAD_DIM + side * (HEAD_DIM / 2) + j] * inv_sum);
    }
}
