// PyTorch's own ops in a ProgramRunner (program_runner.h): the float glue of a packed cell
// network between its kernel calls (BatchNorm in inference, the sums and concatenations of a
// cell's nodes, pads, slices, pools, activations, ReActNet's RPReLU, flatten, dropout in eval). Python binds each as a
// `torch.<op>` kind (bnas.export.program's _TorchCall) with the arguments its module or
// function passes; the runner calls the same ATen function, so the values are the same bit for
// bit, and without the Python module call (5-10 us each on a small map, several times the op).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "program_runner.h"

namespace bnas {


// `kind` without its "torch." prefix; `inputs` the value slots (one, or the tensors of an add or
// a cat); `a` the arguments after them.
inline ProgramFunction program_torch_op(const std::string& kind, const std::vector<int64_t>& inputs,
                                        const pybind11::tuple& a) {
  TORCH_CHECK(!inputs.empty(), "ProgramRunner: torch.", kind, " needs an input slot");
  for (int64_t slot : inputs) TORCH_CHECK(slot >= 0, "ProgramRunner: torch.", kind, ": bad input slot ", slot);
  auto expect = [&](size_t count, size_t slots) {
    TORCH_CHECK(a.size() == count, "ProgramRunner: torch.", kind, " takes ", count, " arguments, got ", a.size());
    TORCH_CHECK(slots == 0 || inputs.size() == slots, "ProgramRunner: torch.", kind, " takes ", slots, " inputs");
  };
  const int64_t x = inputs[0];
  if (kind == "batch_norm") {  // weight, bias, running mean, running variance, momentum, eps, cudnn
    expect(7, 1);
    const auto weight = program_tensor(a, 0), bias = program_tensor(a, 1);
    const auto mean = program_tensor(a, 2), var = program_tensor(a, 3);
    const double momentum = a[4].cast<double>(), eps = a[5].cast<double>();
    const bool cudnn = a[6].cast<bool>();
    return [=](const ProgramInputs& env, int64_t) {
      return ProgramValue{at::batch_norm(program_input(env, x), weight, bias, mean, var, false, momentum, eps, cudnn)};
    };
  }
  if (kind == "add") {
    expect(0, 2);
    const int64_t y = inputs[1];
    return [=](const ProgramInputs& env, int64_t) { return ProgramValue{at::add(program_input(env, x), program_input(env, y))}; };
  }
  if (kind == "cat") {  // dim
    expect(1, 0);
    const int64_t dim = a[0].cast<int64_t>();
    const std::vector<int64_t> slots = inputs;
    return [=](const ProgramInputs& env, int64_t) {
      std::vector<torch::Tensor> parts;
      parts.reserve(slots.size());
      for (int64_t slot : slots) parts.push_back(program_input(env, slot));
      return ProgramValue{at::cat(parts, dim)};
    };
  }
  if (kind == "pad") {  // the pad list, mode, value (None: the mode's default)
    expect(3, 1);
    const std::vector<int64_t> pad = a[0].cast<std::vector<int64_t>>();
    const std::string mode = a[1].cast<std::string>();
    const c10::optional<double> value = a[2].is_none() ? c10::nullopt : c10::optional<double>(a[2].cast<double>());
    return [=](const ProgramInputs& env, int64_t) { return ProgramValue{at::pad(program_input(env, x), pad, mode, value)}; };
  }
  if (kind == "slice") {  // [(dim, start, stop, step)]: x[..., start:stop:step, ...] per dim
    expect(1, 1);
    struct Cut {
      int64_t dim;
      c10::optional<int64_t> start, stop;
      int64_t step;
    };
    std::vector<Cut> cuts;
    for (const pybind11::handle& cut : a[0].cast<pybind11::list>()) {
      const pybind11::tuple t = cut.cast<pybind11::tuple>();
      TORCH_CHECK(t.size() == 4, "ProgramRunner: torch.slice takes (dim, start, stop, step) cuts");
      cuts.push_back({t[0].cast<int64_t>(), program_optional_int(t[1]), program_optional_int(t[2]), t[3].cast<int64_t>()});
    }
    return [=](const ProgramInputs& env, int64_t) {
      torch::Tensor out = program_input(env, x);
      for (const Cut& cut : cuts) out = at::slice(out, cut.dim, cut.start, cut.stop, cut.step);
      return ProgramValue{out};
    };
  }
  if (kind == "relu") {  // inplace
    expect(1, 1);
    const bool inplace = a[0].cast<bool>();
    return [=](const ProgramInputs& env, int64_t) {
      torch::Tensor in = program_input(env, x);  // a handle: relu_ changes the value in its slot, as in Python
      return ProgramValue{inplace ? at::relu_(in) : at::relu(in)};
    };
  }
  if (kind == "hardtanh") {  // min, max, inplace
    expect(3, 1);
    const double low = a[0].cast<double>(), high = a[1].cast<double>();
    const bool inplace = a[2].cast<bool>();
    return [=](const ProgramInputs& env, int64_t) {
      torch::Tensor in = program_input(env, x);  // a handle: hardtanh_ changes the value in its slot, as in Python
      return ProgramValue{inplace ? at::hardtanh_(in, low, high) : at::hardtanh(in, low, high)};
    };
  }
  if (kind == "dropout") {  // p, inplace; bound in eval only, where it returns its input
    expect(2, 1);
    const double p = a[0].cast<double>();
    const bool inplace = a[1].cast<bool>();
    return [=](const ProgramInputs& env, int64_t) {
      torch::Tensor in = program_input(env, x);
      return ProgramValue{inplace ? at::dropout_(in, p, false) : at::dropout(in, p, false)};
    };
  }
  if (kind == "prelu") {  // weight
    expect(1, 1);
    const torch::Tensor weight = a[0].cast<torch::Tensor>();
    return [=](const ProgramInputs& env, int64_t) { return ProgramValue{at::prelu(program_input(env, x), weight)}; };
  }
  if (kind == "rprelu") {  // shift_in, slope, shift_out: bnas.ops.common.RPReLU's forward, op for op
    expect(3, 1);
    const torch::Tensor shift_in = a[0].cast<torch::Tensor>(), slope = a[1].cast<torch::Tensor>();
    const torch::Tensor shift_out = a[2].cast<torch::Tensor>();
    return [=](const ProgramInputs& env, int64_t) {
      const torch::Tensor& in = program_input(env, x);
      std::vector<int64_t> shape(static_cast<size_t>(std::max<int64_t>(in.dim(), 2)), 1);
      shape[1] = -1;  // (1, -1, 1, ...), one per channel
      const torch::Tensor y = at::sub(in, shift_in.view(shape));
      const torch::Tensor z = at::where(at::ge(y, 0), y, at::mul(slope.view(shape), y));
      return ProgramValue{at::add(z, shift_out.view(shape))};
    };
  }
  if (kind == "avg_pool2d") {  // kernel, stride, padding (pairs), ceil_mode, count_include_pad, divisor_override
    expect(6, 1);
    const auto kernel = a[0].cast<std::vector<int64_t>>(), stride = a[1].cast<std::vector<int64_t>>();
    const auto padding = a[2].cast<std::vector<int64_t>>();
    const bool ceil_mode = a[3].cast<bool>(), count_include_pad = a[4].cast<bool>();
    const c10::optional<int64_t> divisor = program_optional_int(a[5]);
    return [=](const ProgramInputs& env, int64_t) {
      return ProgramValue{at::avg_pool2d(program_input(env, x), kernel, stride, padding, ceil_mode, count_include_pad, divisor)};
    };
  }
  if (kind == "max_pool2d") {  // kernel, stride, padding, dilation (pairs), ceil_mode
    expect(5, 1);
    const auto kernel = a[0].cast<std::vector<int64_t>>(), stride = a[1].cast<std::vector<int64_t>>();
    const auto padding = a[2].cast<std::vector<int64_t>>(), dilation = a[3].cast<std::vector<int64_t>>();
    const bool ceil_mode = a[4].cast<bool>();
    return [=](const ProgramInputs& env, int64_t) {
      return ProgramValue{at::max_pool2d(program_input(env, x), kernel, stride, padding, dilation, ceil_mode)};
    };
  }
  if (kind == "flatten") {  // start_dim, end_dim
    expect(2, 1);
    const int64_t start = a[0].cast<int64_t>(), end = a[1].cast<int64_t>();
    return [=](const ProgramInputs& env, int64_t) { return ProgramValue{program_input(env, x).flatten(start, end)}; };
  }
  // The float plan modules on code paths without their AVX-512 kernels, as their dispatch runs
  // them (bnas.export.program._bind_pytorch_float).
  if (kind == "conv2d") {  // weight, bias, stride, padding: the stem on the channels_last image
    expect(4, 1);
    const torch::Tensor weight = a[0].cast<torch::Tensor>();
    const auto bias = program_tensor(a, 1);
    const auto stride = a[2].cast<std::vector<int64_t>>(), padding = a[3].cast<std::vector<int64_t>>();
    return [=](const ProgramInputs& env, int64_t) {
      return ProgramValue{channels_last_conv2d(program_input(env, x), weight, bias, stride, padding)};
    };
  }
  if (kind == "pointwise_conv") {  // weight, bias, pool (1 or 2: a 2x2/2 average pool first), ceil_mode, stride
    expect(5, 1);
    const torch::Tensor weight = a[0].cast<torch::Tensor>();
    const auto bias = program_tensor(a, 1);
    const int64_t pool = a[2].cast<int64_t>(), stride = a[4].cast<int64_t>();
    const bool ceil_mode = a[3].cast<bool>();
    return [=](const ProgramInputs& env, int64_t) {
      torch::Tensor in = program_input(env, x).contiguous(at::MemoryFormat::ChannelsLast);
      if (pool == 2) in = at::avg_pool2d(in, {2, 2}, {}, {0, 0}, ceil_mode, true, c10::nullopt);
      return ProgramValue{at::conv2d(in, weight, bias, {stride, stride})};
    };
  }
  if (kind == "linear") {  // weight, bias
    expect(2, 1);
    const torch::Tensor weight = a[0].cast<torch::Tensor>();
    const auto bias = program_tensor(a, 1);
    return [=](const ProgramInputs& env, int64_t) { return ProgramValue{at::linear(program_input(env, x), weight, bias)}; };
  }
  if (kind == "mean_hw") {  // the global average pool of an (N, C, H, W) map
    expect(0, 1);
    return [=](const ProgramInputs& env, int64_t) {
      const torch::Tensor& in = program_input(env, x);
      TORCH_CHECK(in.dim() == 4, "ProgramRunner: torch.mean_hw takes an (N, C, H, W) map");
      return ProgramValue{at::mean(in, {2, 3})};
    };
  }
  if (kind == "channels_last") {  // the plan's _to_channels_last
    expect(0, 1);
    return [=](const ProgramInputs& env, int64_t) {
      const torch::Tensor& in = program_input(env, x);
      return ProgramValue{in.dim() == 4 ? in.contiguous(at::MemoryFormat::ChannelsLast) : in};
    };
  }
  TORCH_CHECK(false, "ProgramRunner: no torch op of kind 'torch.", kind, "'");
}

}  // namespace bnas
