// The torch boundary of lightx2v_engine._C: argument checks, device guard, current stream, output allocation.
// Kernels live in quant_kernels.cu and know nothing about torch. Ops are registered in the `lightx2v_C`
// namespace (torch.ops.lightx2v_C.*); their fake (meta) implementations are in lightx2v_engine/csrc_ops.py.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "quant_kernels.h"

namespace {

std::tuple<at::Tensor, at::Tensor> per_token_quant(const at::Tensor& x, lx2v::QuantDType qdtype, const char* op,
                                                   bool gelu = false) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": x must be bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, op, ": x must have unit stride along K, got strides ", x.strides());
  TORCH_CHECK(x.size(0) <= 0x7fffffff, op, ": at most 2^31-1 rows, got ", x.size(0));

  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType out_type = qdtype == lx2v::QuantDType::kFP8E4M3 ? at::kFloat8_e4m3fn : at::kChar;
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(out_type));
  at::Tensor scale = at::empty({x.size(0), 1}, x.options().dtype(at::kFloat));

  lx2v::PerTokenQuantParams p{};
  p.x = x.data_ptr();
  p.x_row_stride = x.size(0) > 1 ? x.stride(0) : x.size(1);
  p.q = q.data_ptr();
  p.q_row_stride = x.size(1);
  p.scale = scale.data_ptr<float>();
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.in_dtype = x.scalar_type() == at::kBFloat16 ? lx2v::InDType::kBF16 : lx2v::InDType::kFP16;
  p.out_dtype = qdtype;
  p.gelu = gelu;
  const cudaError_t err = lx2v::per_token_quant(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor> per_token_quant_fp8(const at::Tensor& x) {
  return per_token_quant(x, lx2v::QuantDType::kFP8E4M3, "per_token_quant_fp8");
}

std::tuple<at::Tensor, at::Tensor> per_token_quant_int8(const at::Tensor& x) {
  return per_token_quant(x, lx2v::QuantDType::kINT8, "per_token_quant_int8");
}

// The same on gelu_tanh(x) rounded to x's dtype (the FFN activation fused into ffn.2's input quantization).
std::tuple<at::Tensor, at::Tensor> per_token_quant_fp8_gelu(const at::Tensor& x) {
  return per_token_quant(x, lx2v::QuantDType::kFP8E4M3, "per_token_quant_fp8_gelu", true);
}

std::tuple<at::Tensor, at::Tensor> per_token_quant_int8_gelu(const at::Tensor& x) {
  return per_token_quant(x, lx2v::QuantDType::kINT8, "per_token_quant_int8_gelu", true);
}

}  // namespace

TORCH_LIBRARY(lightx2v_C, m) {
  m.def("per_token_quant_fp8(Tensor x) -> (Tensor, Tensor)");
  m.def("per_token_quant_int8(Tensor x) -> (Tensor, Tensor)");
  m.def("per_token_quant_fp8_gelu(Tensor x) -> (Tensor, Tensor)");
  m.def("per_token_quant_int8_gelu(Tensor x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lightx2v_C, CUDA, m) {
  m.impl("per_token_quant_fp8", &per_token_quant_fp8);
  m.impl("per_token_quant_int8", &per_token_quant_int8);
  m.impl("per_token_quant_fp8_gelu", &per_token_quant_fp8_gelu);
  m.impl("per_token_quant_int8_gelu", &per_token_quant_int8_gelu);
}

// kernel_image_error(device: int) -> str: "" when the build has a kernel image that runs on CUDA device
// `device`, else the CUDA error's name and text (csrc_ops.csrc_available asks once per device).
static PyObject* kernel_image_error(PyObject*, PyObject* arg) {
  const long device = PyLong_AsLong(arg);
  if (device == -1 && PyErr_Occurred()) return nullptr;
  const cudaError_t err = lx2v::kernel_image_check(static_cast<int>(device));
  if (err == cudaSuccess) return PyUnicode_FromString("");
  return PyUnicode_FromFormat("%s: %s", cudaGetErrorName(err), cudaGetErrorString(err));
}

static PyMethodDef module_methods[] = {
    {"kernel_image_error", kernel_image_error, METH_O,
     "kernel_image_error(device) -> '' when the kernels run on that CUDA device, else the CUDA error"},
    {nullptr, nullptr, 0, nullptr}};

// `import lightx2v_engine._C` runs the registrations above; the module's one function is kernel_image_error.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "lightx2v_engine CUDA ops (torch.ops.lightx2v_C)",
                                   -1, module_methods, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
