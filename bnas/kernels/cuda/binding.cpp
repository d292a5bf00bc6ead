// torch binding of the CUDA XNOR kernels: checks tensors, takes the current stream and calls
// the plain-C++ launchers of launch.h.  The only file of the CUDA backend that includes torch.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "launch.h"

namespace {

using bnas_cuda::ConvArgs;

void check(bool ok, const char* msg) { TORCH_CHECK(ok, "bnas xnor cuda: ", msg); }

void check_cuda_tensor(const torch::Tensor& t, torch::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.is_cuda(), "bnas xnor cuda: ", what, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "bnas xnor cuda: ", what, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.is_contiguous(), "bnas xnor cuda: ", what, " must be contiguous");
}

void raise_if(const char* err) { TORCH_CHECK(err == nullptr, "bnas xnor cuda: ", err ? err : ""); }

void conv(const torch::Tensor& x, const torch::Tensor& w, const std::optional<torch::Tensor>& scale,
          const std::optional<torch::Tensor>& bias, const std::optional<torch::Tensor>& out,
          const std::optional<torch::Tensor>& out_packed, const std::vector<int64_t>& dims,
          const torch::Tensor& tap_sums) {
  check(dims.size() == bnas_cuda::kDimCount, "conv dims: wrong number of integers");
  ConvArgs a;
  raise_if(bnas_cuda::conv_shape_from_dims(dims.data(), a.s));
  const auto& s = a.s;
  check_cuda_tensor(x, torch::kInt32, "packed activations");
  check_cuda_tensor(w, torch::kInt32, "packed weights");
  check(x.numel() == (int64_t)s.N * s.H * s.W * s.GW, "packed activations do not match the conv dims");
  check(w.numel() == (int64_t)s.K * s.Q, "packed weights do not match the conv dims");
  const auto dev = x.device();
  check(w.device() == dev, "activations and weights on different devices");
  a.x = reinterpret_cast<const uint32_t*>(x.data_ptr<int32_t>());
  a.w = reinterpret_cast<const uint32_t*>(w.data_ptr<int32_t>());
  a.scale = a.bias = nullptr;
  a.out = nullptr;
  a.out_packed = nullptr;
  if (scale) {
    check_cuda_tensor(*scale, torch::kFloat32, "scale");
    check(scale->numel() == s.K && scale->device() == dev, "scale: one float per output channel, same device");
    a.scale = scale->data_ptr<float>();
  }
  if (bias) {
    check_cuda_tensor(*bias, torch::kFloat32, "bias");
    check(bias->numel() == s.K && bias->device() == dev, "bias: one float per output channel, same device");
    a.bias = bias->data_ptr<float>();
  }
  if (out) {
    check_cuda_tensor(*out, torch::kFloat32, "output");
    check(out->numel() == (int64_t)s.M * s.K && out->device() == dev, "output must be (N, K, OH, OW) on the same device");
    a.out = out->data_ptr<float>();
  }
  if (out_packed) {
    check_cuda_tensor(*out_packed, torch::kInt32, "packed output");
    check(out_packed->numel() == (int64_t)s.M * s.out_GW && out_packed->device() == dev,
          "packed output must be (N, OH, OW, out words) on the same device");
    a.out_packed = reinterpret_cast<uint32_t*>(out_packed->data_ptr<int32_t>());
  }
  check(a.out || a.out_packed, "no output given");
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  // the weights' tap sums, computed once per weight tensor (cuda_backend.tap_sums)
  check_cuda_tensor(tap_sums, torch::kInt32, "tap sums");
  check(tap_sums.numel() == (int64_t)s.K * s.T && tap_sums.device() == dev,
        "tap sums must be (K, KH*KW) on the same device (from tap_sums(w))");
  a.tap_sums = tap_sums.data_ptr<int32_t>();
  torch::Tensor clean;   // activations with stray bits past the channel count cleared
  if (bnas_cuda::activations_need_tail_clearing(s)) {
    clean = torch::empty_like(x);
    raise_if(bnas_cuda::launch_clear_tail_bits(a.x, s, reinterpret_cast<uint32_t*>(clean.data_ptr<int32_t>()), stream));
    a.x = reinterpret_cast<const uint32_t*>(clean.data_ptr<int32_t>());
  }
  // split-K for small grids: a zeroed workspace for the partial sums and arrival counts
  int splits = 1;
  raise_if(bnas_cuda::choose_conv_splits(s, &splits));
  torch::Tensor split_ws;
  if (splits > 1) split_ws = torch::zeros({bnas_cuda::split_workspace_ints(s)}, w.options());
  bnas_cuda::set_split_workspace(a, splits, splits > 1 ? split_ws.data_ptr<int32_t>() : nullptr);
  raise_if(bnas_cuda::launch_xnor_conv(a, stream));
}

void tap_sums(const torch::Tensor& w, const torch::Tensor& out, const std::vector<int64_t>& dims) {
  check(dims.size() == bnas_cuda::kDimCount, "conv dims: wrong number of integers");
  bnas_cuda::ConvShape s;
  raise_if(bnas_cuda::conv_shape_from_dims(dims.data(), s));
  check_cuda_tensor(w, torch::kInt32, "packed weights");
  check(w.numel() == (int64_t)s.K * s.Q, "packed weights do not match the conv dims");
  check_cuda_tensor(out, torch::kInt32, "tap sums");
  check(out.numel() == (int64_t)s.K * s.T && out.device() == w.device(), "tap sums must be (K, KH*KW)");
  const c10::cuda::CUDAGuard guard(w.device());
  raise_if(bnas_cuda::launch_tap_sums(reinterpret_cast<const uint32_t*>(w.data_ptr<int32_t>()), s,
                                      out.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream().stream()));
}

void pack(const torch::Tensor& x, const torch::Tensor& out, int64_t groups) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "bnas xnor cuda: pack input must be a 4-D CUDA tensor");
  int dtype;
  switch (x.scalar_type()) {
    case torch::kFloat32: dtype = bnas_cuda::kPackFloat32; break;
    case torch::kFloat16: dtype = bnas_cuda::kPackFloat16; break;
    case torch::kBFloat16: dtype = bnas_cuda::kPackBFloat16; break;
    default: TORCH_CHECK(false, "bnas xnor cuda: pack input must be float32, float16 or bfloat16");
  }
  bnas_cuda::PackArgs p;
  raise_if(bnas_cuda::pack_args_init(p, (int)x.size(0), (int)x.size(1), (int)x.size(2), (int)x.size(3), (int)groups));
  check_cuda_tensor(out, torch::kInt32, "packed output");
  check(out.numel() == p.total && out.device() == x.device(), "packed output size");
  p.x = x.data_ptr();
  p.sn = x.stride(0); p.sc = x.stride(1); p.sh = x.stride(2); p.sw = x.stride(3);
  p.out = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const c10::cuda::CUDAGuard guard(x.device());
  raise_if(bnas_cuda::launch_pack_signs(p, dtype, c10::cuda::getCurrentCUDAStream().stream()));
}

void mma_peak(const torch::Tensor& out, int64_t blocks, int64_t threads, int64_t iters) {
  check_cuda_tensor(out, torch::kInt32, "mma_peak output");
  check(out.numel() >= blocks * threads, "mma_peak output needs one int per thread");
  const c10::cuda::CUDAGuard guard(out.device());
  raise_if(bnas_cuda::launch_mma_peak(out.data_ptr<int32_t>(), (int)blocks, (int)threads, (int)iters,
                                      c10::cuda::getCurrentCUDAStream().stream()));
}

void mma_single(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& c, const torch::Tensor& d) {
  check_cuda_tensor(a, torch::kInt32, "a fragments");
  check_cuda_tensor(b, torch::kInt32, "b fragments");
  check_cuda_tensor(c, torch::kInt32, "c fragments");
  check_cuda_tensor(d, torch::kInt32, "d fragments");
  check(a.numel() == 128 && b.numel() == 64 && c.numel() == 128 && d.numel() == 128, "fragments: a 32x4, b 32x2, c/d 32x4");
  const c10::cuda::CUDAGuard guard(a.device());
  raise_if(bnas_cuda::launch_mma_single(reinterpret_cast<const uint32_t*>(a.data_ptr<int32_t>()),
                                        reinterpret_cast<const uint32_t*>(b.data_ptr<int32_t>()), c.data_ptr<int32_t>(),
                                        d.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bnas XNOR convolution on 1-bit tensor cores";
  m.def("conv", &conv, "packed XNOR conv with fused epilogue", py::arg("x"), py::arg("w"), py::arg("scale"),
        py::arg("bias"), py::arg("out"), py::arg("out_packed"), py::arg("dims"), py::arg("tap_sums"));
  m.def("tap_sums", &tap_sums, "per (channel, tap) sums of the packed weights, for conv");
  m.def("pack", &pack, "fused sign + bit-pack (NCHW float -> NHWC int32 words)");
  m.def("mma_single", &mma_single, "one warp-wide 1-bit mma on given fragments");
  m.def("mma_peak", &mma_peak, "register-only 1-bit mma.sync throughput kernel");
}
