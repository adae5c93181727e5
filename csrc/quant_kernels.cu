// Per-token 8-bit activation quantization (see quant_kernels.h for the formula).
//
// One pass over HBM: each row is loaded once into registers with 16-byte vector loads (8 elements per
// vector, VPT vectors per thread), reduced to its absolute max, then converted from the registers and stored.
// Rows of up to 2048 elements get one warp each (8 rows per 256-thread block, up to 8 vectors a thread);
// longer rows get one block of 128..1024 threads (up to 4 vectors a thread, within the 64 registers of a
// 1024-thread bound). Rows that are not 16-byte aligned, or longer than 32768 elements, use a scalar kernel
// that reads the row twice (the second read mostly hits L2). The row max propagates NaN, as torch.amax does.
#include "quant_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace lx2v {
namespace {

constexpr int kVecElems = 8;  // 16 bytes of 2-byte inputs
constexpr int kMaxVpt = 8;       // warp mode: at most 8 live 16-byte vectors (32 registers) per thread
constexpr int kMaxVptBlock = 4;  // block mode: at most 4, so that 1024-thread blocks (64 registers) do not spill
constexpr int kWarpRowsBlock = 256;

template <typename InT>
struct InTraits;

template <>
struct InTraits<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  using Elem = __nv_bfloat16;
  static __device__ __forceinline__ float2 to_float2(Pair v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ Pair from_float2(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
  static __device__ __forceinline__ Elem from_float(float f) { return __float2bfloat16_rn(f); }
};

template <>
struct InTraits<__half> {
  using Pair = __half2;
  using Elem = __half;
  static __device__ __forceinline__ float2 to_float2(Pair v) { return __half22float2(v); }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ Pair from_float2(float2 f) { return __floats2half2_rn(f.x, f.y); }
  static __device__ __forceinline__ Elem from_float(float f) { return __float2half_rn(f); }
};

// GELU, tanh approximation, in fp32 (PyTorch's formula and constants; no FMA contraction in the cube term).
__device__ __forceinline__ float gelu_tanh(float x) {
  constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
  constexpr float kKappa = 0.044715f;
  const float inner = kBeta * (x + kKappa * __fmul_rn(__fmul_rn(x, x), x));
  return 0.5f * x * (1.0f + tanhf(inner));
}

// With GELU, the loaded pair is replaced by GELU(tanh) rounded to the input dtype (F.gelu's output).
template <typename Tr, bool GELU>
__device__ __forceinline__ typename Tr::Pair activate(typename Tr::Pair v) {
  if constexpr (GELU) {
    const float2 f = Tr::to_float2(v);
    return Tr::from_float2(make_float2(gelu_tanh(f.x), gelu_tanh(f.y)));
  } else {
    return v;
  }
}

template <QuantDType Q>
struct QuantTraits;

template <>
struct QuantTraits<QuantDType::kFP8E4M3> {
  static constexpr float kMax = kFp8E4m3Max;
  // cvt.rn.satfinite: round-to-nearest-even, out-of-range values saturate to +-448, NaN stays NaN.
  static __device__ __forceinline__ uint16_t pack2(float a, float b) {
    return static_cast<uint16_t>(__nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3));
  }
  static __device__ __forceinline__ uint8_t one(float a) {
    return static_cast<uint8_t>(__nv_cvt_float_to_fp8(a, __NV_SATFINITE, __NV_E4M3));
  }
};

template <>
struct QuantTraits<QuantDType::kINT8> {
  static constexpr float kMax = kInt8Max;
  static __device__ __forceinline__ uint8_t one(float a) {
    int i = __float2int_rn(a);  // round half to even, like torch.round
    i = max(-127, min(127, i));
    return static_cast<uint8_t>(static_cast<int8_t>(i));
  }
  static __device__ __forceinline__ uint16_t pack2(float a, float b) {
    return static_cast<uint16_t>(one(a) | (static_cast<uint16_t>(one(b)) << 8));
  }
};

// max(a, b), NaN if either is NaN (torch.amax propagates NaN; fmaxf would drop it and hide a NaN row).
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Max over the threads of a block (all threads get the result). Needs blockDim.x % 32 == 0.
__device__ __forceinline__ float block_max(float v) {
  __shared__ float partial[32];
  __shared__ float result;
  v = warp_max(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.0f;
    v = warp_max(v);
    if (lane == 0) result = v;
  }
  __syncthreads();
  return result;
}

// x * inv with an IEEE-rounded product (no FMA contraction), so that the PyTorch reference reproduces it bit for bit.
__device__ __forceinline__ float scaled(float x, float inv) { return __fmul_rn(x, inv); }

// WARP_PER_ROW: a warp per row, blockDim.x / 32 rows per block; else one row per block.
template <typename InT, QuantDType Q, int VPT, bool WARP_PER_ROW, bool GELU>
__global__ void __launch_bounds__(WARP_PER_ROW ? kWarpRowsBlock : 1024) per_token_quant_vec_kernel(PerTokenQuantParams p) {
  using Tr = InTraits<InT>;
  using QT = QuantTraits<Q>;
  const int tpr = WARP_PER_ROW ? 32 : static_cast<int>(blockDim.x);
  const int lane = WARP_PER_ROW ? static_cast<int>(threadIdx.x % 32) : static_cast<int>(threadIdx.x);
  const int64_t row = WARP_PER_ROW ? static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32
                                   : static_cast<int64_t>(blockIdx.x);
  if (row >= p.rows) return;  // whole warps (warp mode) or whole blocks (block mode) leave together

  const int nvec = static_cast<int>(p.cols / kVecElems);
  const uint4* x = reinterpret_cast<const uint4*>(static_cast<const InT*>(p.x) + row * p.x_row_stride);
  uint2* q = reinterpret_cast<uint2*>(static_cast<uint8_t*>(p.q) + row * p.q_row_stride);

  uint4 v[VPT];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int idx = lane + i * tpr;
    if (idx < nvec) {
      v[i] = __ldcs(x + idx);  // streaming load: x is read exactly once
      typename Tr::Pair* h = reinterpret_cast<typename Tr::Pair*>(&v[i]);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        h[j] = activate<Tr, GELU>(h[j]);
        const float2 f = Tr::to_float2(h[j]);
        amax = max_nan(amax, max_nan(fabsf(f.x), fabsf(f.y)));
      }
    }
  }
  amax = WARP_PER_ROW ? warp_max(amax) : block_max(amax);
  amax = max_nan(amax, kAmaxMin);
  const float inv = __fdiv_rn(QT::kMax, amax);
  if (lane == 0) p.scale[row] = __fdiv_rn(amax, QT::kMax);

#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int idx = lane + i * tpr;
    if (idx < nvec) {
      const typename Tr::Pair* h = reinterpret_cast<const typename Tr::Pair*>(&v[i]);
      uint16_t packed[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = Tr::to_float2(h[j]);
        packed[j] = QT::pack2(scaled(f.x, inv), scaled(f.y, inv));
      }
      uint2 out;
      out.x = static_cast<uint32_t>(packed[0]) | (static_cast<uint32_t>(packed[1]) << 16);
      out.y = static_cast<uint32_t>(packed[2]) | (static_cast<uint32_t>(packed[3]) << 16);
      q[idx] = out;
    }
  }
}

// Any alignment and length: one block per row, two scalar passes over the row.
template <typename InT, QuantDType Q, bool GELU>
__global__ void per_token_quant_scalar_kernel(PerTokenQuantParams p) {
  using Tr = InTraits<InT>;
  using QT = QuantTraits<Q>;
  const int64_t row = blockIdx.x;
  const InT* x = static_cast<const InT*>(p.x) + row * p.x_row_stride;
  uint8_t* q = static_cast<uint8_t*>(p.q) + row * p.q_row_stride;
  auto load = [&](int64_t j) {
    const float f = Tr::to_float(x[j]);
    return GELU ? Tr::to_float(Tr::from_float(gelu_tanh(f))) : f;
  };
  float amax = 0.0f;
  for (int64_t j = threadIdx.x; j < p.cols; j += blockDim.x) amax = max_nan(amax, fabsf(load(j)));
  amax = max_nan(block_max(amax), kAmaxMin);
  const float inv = __fdiv_rn(QT::kMax, amax);
  if (threadIdx.x == 0) p.scale[row] = __fdiv_rn(amax, QT::kMax);
  for (int64_t j = threadIdx.x; j < p.cols; j += blockDim.x) q[j] = QT::one(scaled(load(j), inv));
}

template <typename InT, QuantDType Q, int VPT, bool GELU>
void launch_vec(const PerTokenQuantParams& p, bool warp_per_row, int threads, cudaStream_t stream) {
  if (warp_per_row) {
    const int rows_per_block = kWarpRowsBlock / 32;
    const int64_t blocks = (p.rows + rows_per_block - 1) / rows_per_block;
    per_token_quant_vec_kernel<InT, Q, VPT, true, GELU>
        <<<static_cast<unsigned>(blocks), kWarpRowsBlock, 0, stream>>>(p);
  } else if constexpr (VPT <= kMaxVptBlock) {  // dispatch() never asks for more in block mode
    per_token_quant_vec_kernel<InT, Q, VPT, false, GELU><<<static_cast<unsigned>(p.rows), threads, 0, stream>>>(p);
  }
}

template <typename InT, QuantDType Q, bool GELU>
void dispatch(const PerTokenQuantParams& p, cudaStream_t stream) {
  const bool aligned = p.cols % kVecElems == 0 && p.x_row_stride % kVecElems == 0 && p.q_row_stride % kVecElems == 0 &&
                       reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && reinterpret_cast<uintptr_t>(p.q) % 8 == 0;
  const int64_t nvec = p.cols / kVecElems;
  bool warp_per_row = false;
  int threads = 0;
  if (aligned && nvec > 0) {
    if (nvec <= 32 * kMaxVpt) {
      warp_per_row = true;
      threads = 32;
    } else {
      for (int t = 128; t <= 1024; t *= 2) {
        if (nvec <= static_cast<int64_t>(t) * kMaxVptBlock) {
          threads = t;
          break;
        }
      }
    }
  }
  if (threads == 0) {
    per_token_quant_scalar_kernel<InT, Q, GELU><<<static_cast<unsigned>(p.rows), 256, 0, stream>>>(p);
    return;
  }
  const int vpt = static_cast<int>((nvec + threads - 1) / threads);
  switch (vpt) {
    case 1: launch_vec<InT, Q, 1, GELU>(p, warp_per_row, threads, stream); break;
    case 2: launch_vec<InT, Q, 2, GELU>(p, warp_per_row, threads, stream); break;
    case 3: launch_vec<InT, Q, 3, GELU>(p, warp_per_row, threads, stream); break;
    case 4: launch_vec<InT, Q, 4, GELU>(p, warp_per_row, threads, stream); break;
    case 5: launch_vec<InT, Q, 5, GELU>(p, warp_per_row, threads, stream); break;
    case 6: launch_vec<InT, Q, 6, GELU>(p, warp_per_row, threads, stream); break;
    case 7: launch_vec<InT, Q, 7, GELU>(p, warp_per_row, threads, stream); break;
    default: launch_vec<InT, Q, 8, GELU>(p, warp_per_row, threads, stream); break;
  }
}

}  // namespace

cudaError_t per_token_quant(const PerTokenQuantParams& p, cudaStream_t stream) {
  if (p.rows <= 0) return cudaSuccess;
  if (p.rows > 0x7fffffff || p.cols < 0) return cudaErrorInvalidValue;
  const bool bf16 = p.in_dtype == InDType::kBF16;
  const bool fp8 = p.out_dtype == QuantDType::kFP8E4M3;
  if (p.gelu) {
    if (bf16 && fp8) dispatch<__nv_bfloat16, QuantDType::kFP8E4M3, true>(p, stream);
    else if (bf16) dispatch<__nv_bfloat16, QuantDType::kINT8, true>(p, stream);
    else if (fp8) dispatch<__half, QuantDType::kFP8E4M3, true>(p, stream);
    else dispatch<__half, QuantDType::kINT8, true>(p, stream);
  } else {
    if (bf16 && fp8) dispatch<__nv_bfloat16, QuantDType::kFP8E4M3, false>(p, stream);
    else if (bf16) dispatch<__nv_bfloat16, QuantDType::kINT8, false>(p, stream);
    else if (fp8) dispatch<__half, QuantDType::kFP8E4M3, false>(p, stream);
    else dispatch<__half, QuantDType::kINT8, false>(p, stream);
  }
  return cudaGetLastError();
}

namespace {

cudaError_t query_kernel_images(int device) {
  int prev = 0;
  cudaError_t err = cudaGetDevice(&prev);
  if (err != cudaSuccess) return err;
  if (prev != device && (err = cudaSetDevice(device)) != cudaSuccess) return err;
  cudaFuncAttributes attr{};
  // one kernel of each template: all come from the same fatbinary, so they share its architectures
  err = cudaFuncGetAttributes(&attr, per_token_quant_scalar_kernel<__nv_bfloat16, QuantDType::kFP8E4M3, false>);
  if (err == cudaSuccess) {
    err = cudaFuncGetAttributes(&attr, per_token_quant_vec_kernel<__half, QuantDType::kINT8, 1, true, true>);
  }
  if (prev != device) {
    const cudaError_t restore = cudaSetDevice(prev);
    if (err == cudaSuccess) err = restore;
  }
  return err;
}

}  // namespace

cudaError_t kernel_image_check(int device) {
  // A failed runtime call also becomes the thread's last error, which the next launch check (ours or torch's)
  // would report as its own: clear it, but only when this query failed and no earlier error was pending (that
  // one belongs to whoever checks next; a failed query has replaced it, so it is then left in place, still an
  // error rather than a silent success). A successful query leaves the last error alone.
  const cudaError_t pending = cudaPeekAtLastError();
  const cudaError_t err = query_kernel_images(device);
  if (err != cudaSuccess && pending == cudaSuccess) cudaGetLastError();
  return err;
}

}  // namespace lx2v
