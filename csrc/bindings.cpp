// Torch binding of the pooling kernels in csrc/pool.cu (llm2vec_fast._C / llm2vec_fast_C).
//
// Includes only torch/extension.h: no c10/cuda headers, so the file compiles with the host
// compiler against a CPU torch wheel (the CI compile test) as well as in the CUDA build.
// The current CUDA stream comes from Python as an integer (torch.cuda.current_stream().cuda_stream)
// and the caller makes hidden's device current (llm2vec_fast/kernels/cuda.py).
#include <torch/extension.h>

#include <cstdint>
#include <vector>

extern "C" int l2v_pool_ncb(int64_t C);
extern "C" int l2v_pool_forward(const void* hidden, int dtype, const uint8_t* region, const int32_t* cu_seqlens,
                                float* e, float* ssq, float* den, int64_t* sel, void* out, float* rnorm, int64_t B,
                                int64_t T, int64_t C, int64_t stride_b, int64_t stride_t, int64_t region_stride_b,
                                int mode, int normalize, int out_f32, void* stream);
extern "C" int l2v_pool_backward(const void* grad_out, int dtype, const float* e, const float* rnorm,
                                 const float* den, const int64_t* sel, const uint8_t* region,
                                 const int32_t* cu_seqlens, float* de, void* grad_hidden, int64_t B, int64_t T,
                                 int64_t C, int64_t stride_b, int64_t stride_t, int64_t region_stride_b, int mode,
                                 int normalize, int out_f32, void* stream);
extern "C" const char* l2v_cuda_error_string(int err);

namespace {

int dtype_code(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return 0;
    case torch::kFloat16: return 1;
    case torch::kBFloat16: return 2;
    default: TORCH_CHECK(false, "hidden: expected fp32, fp16 or bf16, got ", t.scalar_type());
  }
  return -1;
}

void check_ok(int err, const char* what) {
  TORCH_CHECK(err == 0, what, " failed: ", l2v_cuda_error_string(err));
}

struct Layout {
  int64_t B, T, C, sb, st, rb;
  const uint8_t* region;
  const int32_t* cu;
};

// region: uint8 (B, T) / (total,) or an empty tensor; cu_seqlens: int32 (B+1,) or empty.
Layout layout_of(at::IntArrayRef shape, at::IntArrayRef strides, const torch::Tensor& region,
                 const torch::Tensor& cu_seqlens, const torch::Device& dev) {
  Layout l{};
  const bool packed = cu_seqlens.numel() > 0;
  l.C = shape.back();
  if (packed) {
    TORCH_CHECK(shape.size() == 2, "hidden: packed input expects (total, C)");
    TORCH_CHECK(cu_seqlens.scalar_type() == torch::kInt32 && cu_seqlens.dim() == 1 && cu_seqlens.is_contiguous(),
                "cu_seqlens: expected a contiguous int32 (B+1,) tensor");
    TORCH_CHECK(cu_seqlens.device() == dev, "cu_seqlens: expected hidden's device");
    l.B = cu_seqlens.numel() - 1;
    l.T = 0;
    l.sb = 0;
    l.st = strides[0];
    l.cu = cu_seqlens.data_ptr<int32_t>();
  } else {
    TORCH_CHECK(shape.size() == 3, "hidden: padded input expects (B, T, C)");
    l.B = shape[0];
    l.T = shape[1];
    l.sb = strides[0];
    l.st = strides[1];
    l.cu = nullptr;
  }
  l.region = nullptr;
  l.rb = 0;
  if (region.numel() > 0) {
    TORCH_CHECK(region.scalar_type() == torch::kUInt8 && region.device() == dev,
                "region: expected a uint8 tensor on hidden's device");
    TORCH_CHECK(region.stride(-1) == 1, "region: expected unit stride along tokens");
    if (!packed) {
      TORCH_CHECK(region.dim() == 2 && region.size(0) == l.B && region.size(1) == l.T, "region: expected (B, T)");
      l.rb = region.stride(0);
    } else {
      TORCH_CHECK(region.dim() == 1 && region.size(0) == shape[0], "region: expected (total,)");
    }
    l.region = region.data_ptr<uint8_t>();
  }
  return l;
}

}  // namespace

// Returns {out (B, C) in hidden's dtype or fp32, e (B, C) fp32 un-normalised pooled sums,
// rnorm (B,) fp32, den (B,) fp32, sel (B,) int64}; the last four are saved for backward.
std::vector<torch::Tensor> pool_forward(const torch::Tensor& hidden, const torch::Tensor& region,
                                        const torch::Tensor& cu_seqlens, int64_t mode, bool normalize, bool out_f32,
                                        int64_t stream) {
  TORCH_CHECK(hidden.is_cuda(), "hidden: expected a CUDA tensor");
  TORCH_CHECK(hidden.stride(-1) == 1, "hidden: expected a contiguous last dimension");
  TORCH_CHECK(mode >= 0 && mode <= 3, "mode: expected 0..3");
  const int dt = dtype_code(hidden);
  const Layout l = layout_of(hidden.sizes(), hidden.strides(), region, cu_seqlens, hidden.device());
  auto f32 = hidden.options().dtype(torch::kFloat32);
  auto e = torch::empty({l.B, l.C}, f32);
  auto ssq = torch::empty({l.B, static_cast<int64_t>(l2v_pool_ncb(l.C))}, f32);
  auto den = torch::empty({l.B}, f32);
  auto sel = torch::empty({l.B}, hidden.options().dtype(torch::kInt64));
  auto rnorm = torch::empty({l.B}, f32);
  auto out = torch::empty({l.B, l.C}, out_f32 ? f32 : hidden.options());
  check_ok(l2v_pool_forward(hidden.data_ptr(), dt, l.region, l.cu, e.data_ptr<float>(), ssq.data_ptr<float>(),
                            den.data_ptr<float>(), sel.data_ptr<int64_t>(), out.data_ptr(), rnorm.data_ptr<float>(),
                            l.B, l.T, l.C, l.sb, l.st, l.rb, static_cast<int>(mode), normalize ? 1 : 0,
                            out_f32 ? 1 : 0, reinterpret_cast<void*>(stream)),
           "l2v_pool_forward");
  return {out, e, rnorm, den, sel};
}

// d hidden (contiguous, hidden_shape, hidden's dtype) from the gradient of the pooled output.
torch::Tensor pool_backward(const torch::Tensor& grad_out, const torch::Tensor& e, const torch::Tensor& rnorm,
                            const torch::Tensor& den, const torch::Tensor& sel, const torch::Tensor& region,
                            const torch::Tensor& cu_seqlens, std::vector<int64_t> hidden_shape,
                            int64_t hidden_dtype_code, int64_t mode, bool normalize, int64_t stream) {
  TORCH_CHECK(grad_out.is_cuda() && grad_out.is_contiguous() && grad_out.dim() == 2, "grad_out: expected a contiguous CUDA (B, C) tensor");
  TORCH_CHECK(e.scalar_type() == torch::kFloat32 && e.is_contiguous(), "e: expected contiguous fp32");
  TORCH_CHECK(hidden_dtype_code >= 0 && hidden_dtype_code <= 2, "hidden_dtype_code: expected 0..2");
  static const torch::ScalarType kTypes[3] = {torch::kFloat32, torch::kFloat16, torch::kBFloat16};
  const torch::ScalarType ht = kTypes[hidden_dtype_code];
  const bool out_f32 = grad_out.scalar_type() == torch::kFloat32;
  TORCH_CHECK(out_f32 || grad_out.scalar_type() == ht, "grad_out: expected fp32 or hidden's dtype");
  auto dh = torch::empty(hidden_shape, grad_out.options().dtype(ht));
  const Layout l = layout_of(dh.sizes(), dh.strides(), region, cu_seqlens, grad_out.device());
  TORCH_CHECK(grad_out.size(0) == l.B && grad_out.size(1) == l.C, "grad_out: expected (B, C)");
  auto de = torch::empty({l.B, l.C}, grad_out.options().dtype(torch::kFloat32));
  check_ok(l2v_pool_backward(grad_out.data_ptr(), static_cast<int>(hidden_dtype_code), e.data_ptr<float>(),
                             rnorm.data_ptr<float>(), den.data_ptr<float>(), sel.data_ptr<int64_t>(), l.region, l.cu,
                             de.data_ptr<float>(), dh.data_ptr(), l.B, l.T, l.C, l.sb, l.st, l.rb,
                             static_cast<int>(mode), normalize ? 1 : 0, out_f32 ? 1 : 0,
                             reinterpret_cast<void*>(stream)),
           "l2v_pool_backward");
  return dh;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llm2vec-fast CUDA kernels: masked pooling (+ L2 normalisation) forward and backward";
  m.def("pool_forward", &pool_forward, "pooling forward", py::arg("hidden"), py::arg("region"),
        py::arg("cu_seqlens"), py::arg("mode"), py::arg("normalize"), py::arg("out_f32"), py::arg("stream"));
  m.def("pool_backward", &pool_backward, "pooling backward", py::arg("grad_out"), py::arg("e"), py::arg("rnorm"),
        py::arg("den"), py::arg("sel"), py::arg("region"), py::arg("cu_seqlens"), py::arg("hidden_shape"),
        py::arg("hidden_dtype_code"), py::arg("mode"), py::arg("normalize"), py::arg("stream"));
}
