// im2col for a conv2d computed as one GEMM per image, out (c_out, h_out·w_out) = W (c_out, c_in·k·k) ·
// cols (c_in·k·k, h_out·w_out): cols[b][(c·k + kh)·k + kw][oh·w_out + ow] = x[b][c][oh·s − p + kh][ow·s − p + kw]
// (0 outside the image). Consecutive threads take consecutive output columns ow, so both the reads
// (along a row of x) and the writes (along a row of cols) are coalesced, and the GEMM's result is
// already NCHW. Built by build.rs with nvcc (feature `cuda` only), launched from layers/cuda_conv.rs.
// Indices are 32-bit: the caller falls back to candle's conv when cols would reach 2^31 elements.

#include <cuda_fp16.h>

template <typename T>
__device__ void im2col(const T* __restrict__ x, T* __restrict__ cols, const int numel, const int c_in,
                       const int h_in, const int w_in, const int k, const int stride, const int padding,
                       const int h_out, const int w_out) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += gridDim.x * blockDim.x) {
        int t = i;
        const int ow = t % w_out; t /= w_out;
        const int oh = t % h_out; t /= h_out;
        const int kw = t % k; t /= k;
        const int kh = t % k; t /= k;
        const int c = t % c_in;
        const int b = t / c_in;
        const int ih = oh * stride - padding + kh, iw = ow * stride - padding + kw;
        cols[i] = (ih >= 0 && ih < h_in && iw >= 0 && iw < w_in) ? x[((b * c_in + c) * h_in + ih) * w_in + iw] : T(0.f);
    }
}

#define IM2COL(NAME, T)                                                                                          \
    extern "C" __global__ void NAME(const T* x, T* cols, const int numel, const int c_in, const int h_in,         \
                                    const int w_in, const int k, const int stride, const int padding,            \
                                    const int h_out, const int w_out) {                                          \
        im2col<T>(x, cols, numel, c_in, h_in, w_in, k, stride, padding, h_out, w_out);                           \
    }

IM2COL(im2col_f16, __half)
IM2COL(im2col_f32, float)
