// Masked pooling with optional L2 normalisation: forward and backward CUDA kernels.
//
// Shapes: B texts, T tokens per padded text, C hidden size, NCB = ceil(C / POOL_THREADS).
// Padded input: hidden (B, T, C) with strides (sb, st, 1), region (B, T) uint8 with row
// stride rb. Packed input: hidden (total, C) with row stride st, cu_seqlens (B+1,) int32,
// region (total,) uint8 or null (every token pooled).
// Modes: 0 mean, 1 weighted_mean (weights 1..n along the region), 2 last/eos token,
// 3 bos token. An empty region pools to the zero vector.
//
// Only CUDA headers here (no torch): the launchers take raw pointers and a cudaStream_t
// passed as void*, so this file compiles with nvcc on a machine without a CUDA torch
// (csrc/bindings.cpp does the torch side). Every launcher returns cudaGetLastError().
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace {

constexpr int POOL_THREADS = 256;  // one channel per thread: a block covers 256 channels
constexpr int ROW_THREADS = 256;   // per-text reductions (norms)
constexpr float NORM_EPS = 1e-12f; // F.normalize's eps

enum DType { kF32 = 0, kF16 = 1, kBF16 = 2 };

template <typename T> __device__ __forceinline__ float to_f32(T x);
template <> __device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

struct Row {
  int64_t h_off;   // element offset of the text's first token
  int64_t r_off;   // offset of its first region byte
  int64_t len;     // tokens in the text
};

__device__ __forceinline__ Row row_of(int64_t b, const int32_t* cu, int64_t T, int64_t sb, int64_t st, int64_t rb) {
  Row r;
  if (cu != nullptr) {
    const int64_t start = cu[b];
    r.h_off = start * st;
    r.r_off = start;
    r.len = static_cast<int64_t>(cu[b + 1]) - start;
  } else {
    r.h_off = b * sb;
    r.r_off = b * rb;
    r.len = T;
  }
  return r;
}

__device__ __forceinline__ bool in_region(const uint8_t* region, int64_t off) {
  return region == nullptr || region[off] != 0;
}

// Sum over the block; every thread gets the result. `smem` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float t = 0.f;
  for (int i = 0; i < nw; ++i) t += smem[i];
  return t;
}

// Index of the region's last (LAST) or first token, -1 if empty; whole block cooperates.
template <bool LAST>
__device__ int64_t find_token(const uint8_t* region, const Row& row, int64_t* smem) {
  int64_t best = LAST ? -1 : INT64_MAX;
  for (int64_t t = threadIdx.x; t < row.len; t += blockDim.x) {
    if (in_region(region, row.r_off + t)) best = LAST ? (t > best ? t : best) : (t < best ? t : best);
  }
  __syncthreads();
  smem[threadIdx.x] = best;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const int64_t o = smem[threadIdx.x + s];
      smem[threadIdx.x] = LAST ? (o > smem[threadIdx.x] ? o : smem[threadIdx.x])
                               : (o < smem[threadIdx.x] ? o : smem[threadIdx.x]);
    }
    __syncthreads();
  }
  const int64_t r = smem[0];
  return (!LAST && r == INT64_MAX) ? -1 : r;
}

// Grid (B, NCB), POOL_THREADS threads. Writes e (B, C) fp32 = sum_t w_t h_t / den, the
// per-block partial sums of squares ssq (B, NCB), den (B,) and sel (B,) (last/bos).
template <typename scalar_t, int MODE>
__global__ void __launch_bounds__(POOL_THREADS) pool_fwd_kernel(
    const scalar_t* __restrict__ h, const uint8_t* __restrict__ region, const int32_t* __restrict__ cu,
    float* __restrict__ e, float* __restrict__ ssq, float* __restrict__ den_out, int64_t* __restrict__ sel_out,
    int64_t T, int64_t C, int64_t sb, int64_t st, int64_t rb) {
  __shared__ int64_t smem_i[POOL_THREADS];
  __shared__ float smem_f[POOL_THREADS / 32];
  const int64_t b = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * POOL_THREADS + threadIdx.x;
  const bool active = c < C;
  const Row row = row_of(b, cu, T, sb, st, rb);
  const scalar_t* hb = h + row.h_off + (active ? c : 0);
  float acc = 0.f, den = 1.f;
  int64_t sel = -1;
  if (MODE <= 1) {
    // Every thread walks the same tokens (the region byte is a broadcast load) and reads
    // its own channel: a warp reads 32 consecutive channels of a token row, coalesced.
    float rank = 0.f, wsum = 0.f;
#pragma unroll 4
    for (int64_t t = 0; t < row.len; ++t) {
      if (!in_region(region, row.r_off + t)) continue;  // padding / instruction tokens never read
      rank += 1.f;
      const float w = MODE == 1 ? rank : 1.f;
      wsum += w;
      if (active) acc += w * to_f32(hb[t * st]);
    }
    den = fmaxf(wsum, 1.f);
    acc /= den;
  } else {
    sel = MODE == 2 ? find_token<true>(region, row, smem_i) : find_token<false>(region, row, smem_i);
    if (active && sel >= 0) acc = to_f32(hb[sel * st]);
  }
  if (active) e[b * C + c] = acc;
  const float s = block_sum(active ? acc * acc : 0.f, smem_f);
  if (threadIdx.x == 0) {
    ssq[b * gridDim.y + blockIdx.y] = s;
    if (blockIdx.y == 0) {
      den_out[b] = den;
      sel_out[b] = sel;
    }
  }
}

// One block per text: out = e / max(||e||, eps) (or e) in the output dtype; rnorm (B,).
template <typename out_t>
__global__ void __launch_bounds__(ROW_THREADS) pool_finish_kernel(
    const float* __restrict__ e, const float* __restrict__ ssq, int ncb, out_t* __restrict__ out,
    float* __restrict__ rnorm, int64_t C, int normalize) {
  const int64_t b = blockIdx.x;
  float s = 0.f;
  for (int i = 0; i < ncb; ++i) s += ssq[b * ncb + i];
  const float r = normalize ? 1.f / fmaxf(sqrtf(s), NORM_EPS) : 1.f;
  if (threadIdx.x == 0) rnorm[b] = r;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) out[b * C + c] = from_f32<out_t>(e[b * C + c] * r);
}

// One block per text: de = d(out)/d(e)^T g, divided by den (the 1/den of the pooling).
// With normalisation (n = e * rnorm, ||e|| >= eps): de = rnorm (g - n <g, n>); below eps
// F.normalize divides by the constant eps, so de = g * rnorm.
template <typename out_t>
__global__ void __launch_bounds__(ROW_THREADS) pool_grad_e_kernel(
    const out_t* __restrict__ g, const float* __restrict__ e, const float* __restrict__ rnorm,
    const float* __restrict__ den, float* __restrict__ de, int64_t C, int normalize) {
  __shared__ float smem_f[ROW_THREADS / 32];
  const int64_t b = blockIdx.x;
  const float r = rnorm[b];
  const float inv_den = 1.f / den[b];
  float dot = 0.f;
  const bool project = normalize && r < 1.f / NORM_EPS;
  if (project) {
    float part = 0.f;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) part += to_f32(g[b * C + c]) * e[b * C + c] * r;
    dot = block_sum(part, smem_f);
  }
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float gc = to_f32(g[b * C + c]);
    const float v = project ? r * (gc - e[b * C + c] * r * dot) : gc * r;
    de[b * C + c] = v * inv_den;
  }
}

// Grid (B, NCB): d hidden[t, c] = w_t * de[c], written for every token of the text (zeros
// outside the region), in hidden's dtype: no fp32 copy of the hidden states.
template <typename scalar_t, int MODE>
__global__ void __launch_bounds__(POOL_THREADS) pool_bwd_kernel(
    const float* __restrict__ de, const uint8_t* __restrict__ region, const int32_t* __restrict__ cu,
    const int64_t* __restrict__ sel, scalar_t* __restrict__ dh, int64_t T, int64_t C, int64_t sb, int64_t st,
    int64_t rb) {
  const int64_t b = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * POOL_THREADS + threadIdx.x;
  if (c >= C) return;  // no block-wide sync below
  const Row row = row_of(b, cu, T, sb, st, rb);
  const float g = de[b * C + c];
  const int64_t s = sel[b];
  scalar_t* out = dh + row.h_off + c;
  float rank = 0.f;
#pragma unroll 4
  for (int64_t t = 0; t < row.len; ++t) {
    float w;
    if (MODE <= 1) {
      const bool r = in_region(region, row.r_off + t);
      rank += r ? 1.f : 0.f;
      w = r ? (MODE == 1 ? rank : 1.f) : 0.f;
    } else {
      w = t == s ? 1.f : 0.f;
    }
    // selected, not w * g: an inf / NaN g must give 0, not NaN, outside the region
    out[t * st] = from_f32<scalar_t>(w != 0.f ? w * g : 0.f);
  }
}

template <typename scalar_t>
cudaError_t launch_fwd(const void* h, const uint8_t* region, const int32_t* cu, float* e, float* ssq, float* den,
                       int64_t* sel, void* out, float* rnorm, int64_t B, int64_t T, int64_t C, int64_t sb,
                       int64_t st, int64_t rb, int mode, int normalize, int out_f32, cudaStream_t stream) {
  const int ncb = static_cast<int>((C + POOL_THREADS - 1) / POOL_THREADS);
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(ncb));
  const scalar_t* hp = static_cast<const scalar_t*>(h);
  switch (mode) {
    case 0: pool_fwd_kernel<scalar_t, 0><<<grid, POOL_THREADS, 0, stream>>>(hp, region, cu, e, ssq, den, sel, T, C, sb, st, rb); break;
    case 1: pool_fwd_kernel<scalar_t, 1><<<grid, POOL_THREADS, 0, stream>>>(hp, region, cu, e, ssq, den, sel, T, C, sb, st, rb); break;
    case 2: pool_fwd_kernel<scalar_t, 2><<<grid, POOL_THREADS, 0, stream>>>(hp, region, cu, e, ssq, den, sel, T, C, sb, st, rb); break;
    case 3: pool_fwd_kernel<scalar_t, 3><<<grid, POOL_THREADS, 0, stream>>>(hp, region, cu, e, ssq, den, sel, T, C, sb, st, rb); break;
    default: return cudaErrorInvalidValue;
  }
  // The output is hidden's dtype, or fp32 when the caller keeps fp32 embeddings for a loss.
  if (out_f32)
    pool_finish_kernel<float><<<static_cast<unsigned>(B), ROW_THREADS, 0, stream>>>(
        e, ssq, ncb, static_cast<float*>(out), rnorm, C, normalize);
  else
    pool_finish_kernel<scalar_t><<<static_cast<unsigned>(B), ROW_THREADS, 0, stream>>>(
        e, ssq, ncb, static_cast<scalar_t*>(out), rnorm, C, normalize);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_bwd(const void* g, const float* e, const float* rnorm, const float* den, const int64_t* sel,
                       const uint8_t* region, const int32_t* cu, float* de, void* dh, int64_t B, int64_t T, int64_t C,
                       int64_t sb, int64_t st, int64_t rb, int mode, int normalize, int out_f32,
                       cudaStream_t stream) {
  if (out_f32)
    pool_grad_e_kernel<float><<<static_cast<unsigned>(B), ROW_THREADS, 0, stream>>>(
        static_cast<const float*>(g), e, rnorm, den, de, C, normalize);
  else
    pool_grad_e_kernel<scalar_t><<<static_cast<unsigned>(B), ROW_THREADS, 0, stream>>>(
        static_cast<const scalar_t*>(g), e, rnorm, den, de, C, normalize);
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>((C + POOL_THREADS - 1) / POOL_THREADS));
  scalar_t* d = static_cast<scalar_t*>(dh);
  switch (mode) {
    case 0: pool_bwd_kernel<scalar_t, 0><<<grid, POOL_THREADS, 0, stream>>>(de, region, cu, sel, d, T, C, sb, st, rb); break;
    case 1: pool_bwd_kernel<scalar_t, 1><<<grid, POOL_THREADS, 0, stream>>>(de, region, cu, sel, d, T, C, sb, st, rb); break;
    case 2:
    case 3: pool_bwd_kernel<scalar_t, 2><<<grid, POOL_THREADS, 0, stream>>>(de, region, cu, sel, d, T, C, sb, st, rb); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

// ----------------------------------------------------------------------------------------
// C launchers (called from csrc/bindings.cpp). dtype: 0 fp32, 1 fp16, 2 bf16 (hidden's);
// out_f32: the pooled output (and its incoming gradient) is fp32 instead of hidden's dtype.
// Scratch buffers (all on the device, allocated by the caller):
//   e (B, C) fp32, ssq (B, ceil(C/256)) fp32, den (B,) fp32, sel (B,) int64, rnorm (B,) fp32.
// region / cu may be null (no region mask / padded input).
// ----------------------------------------------------------------------------------------

extern "C" int l2v_pool_ncb(int64_t C) { return static_cast<int>((C + POOL_THREADS - 1) / POOL_THREADS); }

extern "C" int l2v_pool_forward(const void* hidden, int dtype, const uint8_t* region, const int32_t* cu_seqlens,
                                float* e, float* ssq, float* den, int64_t* sel, void* out, float* rnorm, int64_t B,
                                int64_t T, int64_t C, int64_t stride_b, int64_t stride_t, int64_t region_stride_b,
                                int mode, int normalize, int out_f32, void* stream) {
  if (B == 0 || C == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kF32: return launch_fwd<float>(hidden, region, cu_seqlens, e, ssq, den, sel, out, rnorm, B, T, C, stride_b, stride_t, region_stride_b, mode, normalize, out_f32, s);
    case kF16: return launch_fwd<__half>(hidden, region, cu_seqlens, e, ssq, den, sel, out, rnorm, B, T, C, stride_b, stride_t, region_stride_b, mode, normalize, out_f32, s);
    case kBF16: return launch_fwd<__nv_bfloat16>(hidden, region, cu_seqlens, e, ssq, den, sel, out, rnorm, B, T, C, stride_b, stride_t, region_stride_b, mode, normalize, out_f32, s);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" int l2v_pool_backward(const void* grad_out, int dtype, const float* e, const float* rnorm,
                                 const float* den, const int64_t* sel, const uint8_t* region,
                                 const int32_t* cu_seqlens, float* de, void* grad_hidden, int64_t B, int64_t T,
                                 int64_t C, int64_t stride_b, int64_t stride_t, int64_t region_stride_b, int mode,
                                 int normalize, int out_f32, void* stream) {
  if (B == 0 || C == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kF32: return launch_bwd<float>(grad_out, e, rnorm, den, sel, region, cu_seqlens, de, grad_hidden, B, T, C, stride_b, stride_t, region_stride_b, mode, normalize, out_f32, s);
    case kF16: return launch_bwd<__half>(grad_out, e, rnorm, den, sel, region, cu_seqlens, de, grad_hidden, B, T, C, stride_b, stride_t, region_stride_b, mode, normalize, out_f32, s);
    case kBF16: return launch_bwd<__nv_bfloat16>(grad_out, e, rnorm, den, sel, region, cu_seqlens, de, grad_hidden, B, T, C, stride_b, stride_t, region_stride_b, mode, normalize, out_f32, s);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" const char* l2v_cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }
