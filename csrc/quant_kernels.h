// Torch-free 8-bit activation quantization kernels: pointers, sizes, strides and a stream in, an error code out.
//
// Per-token (per-row) dynamic quantization of x [rows, cols] (bf16 or fp16, unit column stride):
//   amax_r  = max(max_j |x[r, j]|, kAmaxMin)
//   inv_r   = QMAX / amax_r                    (IEEE-rounded division)
//   q[r, j] = cvt(x[r, j] * inv_r)             fp8 e4m3: round-to-nearest-even, saturated to +-448
//                                              int8: round-half-even, clamped to +-127
//   scale_r = amax_r / QMAX                    so that x ~= q * scale_r
// with QMAX = 448 (fp8 e4m3) or 127 (int8). The PyTorch reference is lightx2v_engine.quant.per_token_quant_ref.
// With `gelu`, x is first replaced by GELU(tanh)(x) rounded to its dtype (the FFN's activation fused into the
// quantization of ffn.2's input: one pass instead of two).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace lx2v {

constexpr float kFp8E4m3Max = 448.0f;
constexpr float kInt8Max = 127.0f;
// Rows whose |x| max is below this are treated as having this max (avoids 0 * inf; the row quantizes to ~0).
constexpr float kAmaxMin = 1e-12f;

enum class InDType : int { kBF16 = 0, kFP16 = 1 };
enum class QuantDType : int { kFP8E4M3 = 0, kINT8 = 1 };

struct PerTokenQuantParams {
  const void* x;         // [rows, cols], element (r, j) at x + r * x_row_stride + j
  int64_t x_row_stride;  // in elements
  void* q;               // [rows, cols] 1-byte elements, (r, j) at q + r * q_row_stride + j
  int64_t q_row_stride;  // in elements
  float* scale;          // [rows], contiguous
  int64_t rows;
  int64_t cols;
  InDType in_dtype;
  QuantDType out_dtype;
  // Quantize gelu_tanh(x) instead of x: y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in fp32, rounded
  // to the input dtype first (what F.gelu(x, approximate="tanh") returns), then the formula above on y.
  bool gelu = false;
};

// Launches on `stream`; returns the launch error (cudaSuccess when nothing went wrong). rows == 0 is a no-op;
// cols == 0 writes scale_r = kAmaxMin / QMAX.
cudaError_t per_token_quant(const PerTokenQuantParams& p, cudaStream_t stream);

// cudaSuccess when this build holds a kernel image (an exact cubin, or PTX the driver can JIT) that runs on
// CUDA device `device`; else the error (cudaErrorNoKernelImageForDevice / cudaErrorInvalidDeviceFunction, e.g.
// a 9.0-only build on an sm_80 card). Queries the kernels' attributes: no launch, no stream work; the current
// device is restored, and a failed query's error is cleared from the thread's last error (unless another error
// was already pending there).
cudaError_t kernel_image_check(int device);

}  // namespace lx2v
