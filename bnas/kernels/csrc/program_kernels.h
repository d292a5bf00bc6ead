// The kernel calls a ProgramRunner (program_runner.h) replays, by kind.
#pragma once

#include <torch/extension.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "binary_conv.h"
#include "float_kernel_calls.h"
#include "float_pooling.h"
#include "grouped_conv.h"
#include "program_runner.h"
#include "program_torch_ops.h"
#include "real_binary_linear.h"
#include "sign_packing.h"

// Internal linkage: compiled into the one translation unit xnor_cpu.cpp, whose module
// (PYBIND11_MODULE) binds these functions for Python.
namespace {

// ---------------------------------------------------------------------------------------
// The kernel calls a ProgramRunner replays (program_runner.h, bnas.export.program): `kind`
// names an entry point above, `args` are the arguments Python binds after the input (in the
// order bnas.kernels.cpu_backend's KernelCall.args holds them), `inputs` the slots of the
// input and, for a packed step, of its residual (-1: none). `take` >= 0 keeps one tensor of
// a call that returns two. Each call is the one the Python program makes, argument for
// argument, so the outputs are the same bit for bit.
// ---------------------------------------------------------------------------------------
template <class T>
T program_arg(const py::tuple& args, size_t i) {
  return args[i].cast<T>();
}

using bnas::program_input;
using bnas::program_tensor;

bnas::ProgramValue program_pair(torch::Tensor first, torch::Tensor second, int64_t take) {
  if (take == 0) return {std::move(first), torch::Tensor(), false};
  if (take == 1) return {std::move(second), torch::Tensor(), false};
  return {std::move(first), std::move(second), true};
}

// A fused step's residual: none (slot -1), or the value channels_last (no copy when it is,
// as in Python).
c10::optional<torch::Tensor> step_residual(const bnas::ProgramInputs& env, int64_t slot) {
  if (slot < 0) return c10::nullopt;
  return program_input(env, slot).contiguous(at::MemoryFormat::ChannelsLast);
}

// A fused step's value from its [float, packed] outputs: both as a pair (or the one `take`
// keeps), else the one it wrote.
bnas::ProgramValue step_value(const std::vector<torch::Tensor>& out, bool float_output, bool pack_output, int64_t take) {
  if (float_output && pack_output) return program_pair(out[0], out[1], take);
  return bnas::ProgramValue{float_output ? out[0] : out[1], torch::Tensor(), false};
}

bnas::ProgramFunction program_kernel(const std::string& kind, const std::vector<int64_t>& inputs,
                                     const py::tuple& a, int64_t take) {
  if (kind.rfind("torch.", 0) == 0) {
    TORCH_CHECK(take < 0, "ProgramRunner: ", kind, " returns one tensor");
    return bnas::program_torch_op(kind.substr(6), inputs, a);
  }
  TORCH_CHECK(!inputs.empty() && inputs[0] >= 0, "ProgramRunner: ", kind, " needs an input slot");
  const int64_t x = inputs[0];
  auto expect = [&](size_t count) {
    TORCH_CHECK(a.size() == count, "ProgramRunner: ", kind, " takes ", count, " arguments, got ", a.size());
  };
  if (kind == "conv2d_packed_fused") {
    // lanes, in and out channels, kh, kw, sh, sw, ph, pw, dh, dw, groups, scale, bias,
    // float_output, pack_output, into_residual, pack_threshold, rprelu ([] or its three
    // parameters), isa, the groups to pack a float input in first (0: the input comes packed)
    // and the threshold it is packed against
    expect(22);
    TORCH_CHECK(inputs.size() == 2, "ProgramRunner: a packed step has an input and a residual slot");
    const int64_t residual_slot = inputs[1];
    const torch::Tensor lanes = program_arg<torch::Tensor>(a, 0);
    std::array<int64_t, 10> geometry{};  // in and out channels, then the 8 of the conv
    for (size_t i = 0; i < geometry.size(); ++i) geometry[i] = program_arg<int64_t>(a, 1 + i);
    const int64_t groups = program_arg<int64_t>(a, 11);
    const auto scale = program_tensor(a, 12), bias = program_tensor(a, 13);
    const bool float_output = program_arg<bool>(a, 14), pack_output = program_arg<bool>(a, 15);
    const bool into_residual = program_arg<bool>(a, 16);
    const auto pack_threshold = program_tensor(a, 17);
    const auto rprelu = program_arg<std::vector<torch::Tensor>>(a, 18);
    const int64_t isa = program_arg<int64_t>(a, 19), pack_groups = program_arg<int64_t>(a, 20);
    const auto threshold = program_tensor(a, 21);
    return [=](const bnas::ProgramInputs& env, int64_t threads) {
      const c10::optional<torch::Tensor> residual = step_residual(env, residual_slot);
      const torch::Tensor& in = program_input(env, x);
      const torch::Tensor xp = pack_groups > 0 ? pack_signs(in, pack_groups, isa, threads, threshold) : in;
      const std::vector<torch::Tensor> out = conv2d_packed_fused(
          xp, lanes, geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5], geometry[6],
          geometry[7], geometry[8], geometry[9], groups, scale, bias, residual, float_output, pack_output,
          into_residual && residual.has_value(), pack_threshold, rprelu, isa, threads);
      return step_value(out, float_output, pack_output, take);
    };
  }
  if (kind == "grouped_conv_fused") {
    // weight words, channels, channels per group, kh, kw, sh, sw, ph, pw, dh, dw, scale, bias,
    // float_output, pack_output, into_residual, pack_threshold, rprelu, isa
    expect(19);
    TORCH_CHECK(inputs.size() == 2, "ProgramRunner: a packed step has an input and a residual slot");
    const int64_t residual_slot = inputs[1];
    const torch::Tensor words = program_arg<torch::Tensor>(a, 0);
    const int64_t channels = program_arg<int64_t>(a, 1), per_group = program_arg<int64_t>(a, 2);
    std::array<int64_t, 8> geometry{};
    for (size_t i = 0; i < geometry.size(); ++i) geometry[i] = program_arg<int64_t>(a, 3 + i);
    const auto scale = program_tensor(a, 11), bias = program_tensor(a, 12);
    const bool float_output = program_arg<bool>(a, 13), pack_output = program_arg<bool>(a, 14);
    const bool into_residual = program_arg<bool>(a, 15);
    const auto pack_threshold = program_tensor(a, 16);
    const auto rprelu = program_arg<std::vector<torch::Tensor>>(a, 17);
    const int64_t isa = program_arg<int64_t>(a, 18);
    return [=](const bnas::ProgramInputs& env, int64_t threads) {
      const c10::optional<torch::Tensor> residual = step_residual(env, residual_slot);
      const std::vector<torch::Tensor> out = grouped_conv_fused(
          program_input(env, x), words, channels, per_group, geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5],
          geometry[6], geometry[7], scale, bias, residual, float_output, pack_output,
          into_residual && residual.has_value(), pack_threshold, rprelu, isa, threads);
      return step_value(out, float_output, pack_output, take);
    };
  }
  if (kind == "image_conv_nhwc" || kind == "image_conv_nhwc_or_conv2d") {
    // weights, w_scale, w_sum, bias, out_channels, kh, kw, sh, sw, ph, pw, the pool's kh, kw,
    // sh, sw, ph, pw, pack_output, grid_scale, grid_zero_point; the _or_conv2d kind also the
    // conv's weight and bias and the multiply-adds per image below which a stem is PyTorch's
    // conv on the channels_last image (bnas.export.plan.ImageConv2d.small_float_stem)
    const bool or_conv2d = kind == "image_conv_nhwc_or_conv2d";
    expect(or_conv2d ? 23 : 20);
    TORCH_CHECK(!or_conv2d || take == 0, "ProgramRunner: ", kind, " keeps the map alone");
    const torch::Tensor conv_weight = or_conv2d ? program_arg<torch::Tensor>(a, 20) : torch::Tensor();
    const auto conv_bias = or_conv2d ? program_tensor(a, 21) : c10::nullopt;
    const int64_t min_macs = or_conv2d ? program_arg<int64_t>(a, 22) : 0;
    const torch::Tensor weights = program_arg<torch::Tensor>(a, 0);
    const auto w_scale = program_tensor(a, 1), w_sum = program_tensor(a, 2), bias = program_tensor(a, 3);
    std::array<int64_t, 13> geometry{};
    for (size_t i = 0; i < geometry.size(); ++i) geometry[i] = program_arg<int64_t>(a, 4 + i);
    const bool pack_output = program_arg<bool>(a, 17);
    const double grid_scale = program_arg<double>(a, 18);
    const int64_t grid_zero_point = program_arg<int64_t>(a, 19);
    return [=](const bnas::ProgramInputs& env, int64_t threads) {
      const torch::Tensor& in = program_input(env, x);
      if (or_conv2d && in.dim() == 4) {
        const int64_t kh = geometry[1], kw = geometry[2], sh = geometry[3], sw = geometry[4];
        const int64_t ph = geometry[5], pw = geometry[6];
        auto out_size = [](int64_t span, int64_t stride) { return span < 0 ? 0 : span / stride + 1; };
        const int64_t oh = out_size(in.size(2) + 2 * ph - kh, sh), ow = out_size(in.size(3) + 2 * pw - kw, sw);
        if (geometry[0] * in.size(1) * kh * kw * oh * ow < min_macs)
          return bnas::ProgramValue{
              bnas::channels_last_conv2d(in, conv_weight, conv_bias, {sh, sw}, {ph, pw})};
      }
      auto [out, packed] = image_conv_nhwc(
          in, weights, w_scale, w_sum, bias, geometry[0], geometry[1], geometry[2],
          geometry[3], geometry[4], geometry[5], geometry[6], geometry[7], geometry[8], geometry[9],
          geometry[10], geometry[11], geometry[12], pack_output, grid_scale, grid_zero_point, threads);
      return program_pair(std::move(out), std::move(packed), take);
    };
  }
  if (kind == "conv2d_max_pool") {
    // weight, bias, sh, sw, ph, pw, the pool's kh, kw, sh, sw, ph, pw, pack_output, isa: PyTorch's
    // conv on the channels_last image and its max-pool, channels_last, and the pooled map's
    // packed signs (bnas.kernels.conv2d_max_pool without the AVX-512 kernel)
    expect(14);
    const torch::Tensor weight = program_arg<torch::Tensor>(a, 0);
    const auto bias = program_tensor(a, 1);
    std::array<int64_t, 10> geometry{};
    for (size_t i = 0; i < geometry.size(); ++i) geometry[i] = program_arg<int64_t>(a, 2 + i);
    const bool pack_output = program_arg<bool>(a, 12);
    const int64_t isa = program_arg<int64_t>(a, 13);
    return [=](const bnas::ProgramInputs& env, int64_t threads) {
      const torch::Tensor conv = bnas::channels_last_conv2d(program_input(env, x), weight, bias,
                                                            {geometry[0], geometry[1]}, {geometry[2], geometry[3]});
      torch::Tensor pooled = at::max_pool2d(conv, {geometry[4], geometry[5]}, {geometry[6], geometry[7]},
                                            {geometry[8], geometry[9]})
                                 .contiguous(at::MemoryFormat::ChannelsLast);
      if (!pack_output) return bnas::ProgramValue{pooled};
      torch::Tensor packed = pack_signs(pooled, 1, isa, threads);
      return program_pair(std::move(pooled), std::move(packed), take);
    };
  }
  if (kind == "max_pool2d_nhwc") {
    expect(8);  // kh, kw, sh, sw, ph, pw, isa, pack_output
    std::array<int64_t, 7> geometry{};
    for (size_t i = 0; i < geometry.size(); ++i) geometry[i] = program_arg<int64_t>(a, i);
    const bool pack_output = program_arg<bool>(a, 7);
    return [=](const bnas::ProgramInputs& env, int64_t threads) {
      auto [out, packed] = max_pool2d_nhwc(program_input(env, x), geometry[0], geometry[1], geometry[2], geometry[3],
                                           geometry[4], geometry[5], geometry[6], threads, pack_output);
      return program_pair(std::move(out), std::move(packed), take);
    };
  }
  TORCH_CHECK(take < 0, "ProgramRunner: ", kind, " returns one tensor");
  if (kind == "pointwise_conv_nhwc") {
    expect(6);  // transposed weights, out_channels, bias, pool, ceil_mode, stride
    const torch::Tensor wt = program_arg<torch::Tensor>(a, 0);
    const int64_t out_channels = program_arg<int64_t>(a, 1);
    const auto bias = program_tensor(a, 2);
    const int64_t pool = program_arg<int64_t>(a, 3), stride = program_arg<int64_t>(a, 5);
    const bool ceil_mode = program_arg<bool>(a, 4);
    return [=](const bnas::ProgramInputs& env, int64_t threads) {  // channels_last first, as in Python
      const torch::Tensor in = program_input(env, x).contiguous(at::MemoryFormat::ChannelsLast);
      return bnas::ProgramValue{pointwise_conv_nhwc(in, wt, out_channels, bias, pool, ceil_mode, stride, threads)};
    };
  }
  if (kind == "int8_pointwise_conv_nhwc" || kind == "int8_linear") {
    // weights, w_scale, w_sum, out_channels, bias, pool, ceil_mode, stride; int8_linear: an
    // (N, C) input as the (N, C, 1, 1) map, the output as (N, K)
    expect(8);
    const torch::Tensor weights = program_arg<torch::Tensor>(a, 0), w_scale = program_arg<torch::Tensor>(a, 1);
    const torch::Tensor w_sum = program_arg<torch::Tensor>(a, 2);
    const int64_t out_channels = program_arg<int64_t>(a, 3);
    const auto bias = program_tensor(a, 4);
    const int64_t pool = program_arg<int64_t>(a, 5), stride = program_arg<int64_t>(a, 7);
    const bool ceil_mode = program_arg<bool>(a, 6), rows = kind == "int8_linear";
    return [=](const bnas::ProgramInputs& env, int64_t threads) {
      const torch::Tensor& given = program_input(env, x);  // a map channels_last first, as in Python
      const torch::Tensor in = rows ? given : given.contiguous(at::MemoryFormat::ChannelsLast);
      TORCH_CHECK(!rows || in.dim() == 2, "ProgramRunner: int8_linear takes (N, C) rows");
      const torch::Tensor out = int8_pointwise_conv_nhwc(rows ? in.view({in.size(0), in.size(1), 1, 1}) : in, weights,
                                                         w_scale, w_sum, out_channels, bias, pool, ceil_mode, stride,
                                                         threads);
      return bnas::ProgramValue{rows ? out.view({in.size(0), out_channels}) : out};
    };
  }
  if (kind == "linear_packed_float") {
    // lanes, in_features, out_features, scale, bias, isa, threshold: the rows' signs packed first
    expect(7);
    const torch::Tensor lanes = program_arg<torch::Tensor>(a, 0);
    const int64_t in_features = program_arg<int64_t>(a, 1), out_features = program_arg<int64_t>(a, 2);
    const auto scale = program_tensor(a, 3), bias = program_tensor(a, 4);
    const int64_t isa = program_arg<int64_t>(a, 5);
    const auto threshold = program_tensor(a, 6);
    return [=](const bnas::ProgramInputs& env, int64_t threads) {
      const torch::Tensor xp = pack_signs(program_input(env, x), 1, isa, threads, threshold);
      return bnas::ProgramValue{linear_packed(xp, lanes, in_features, out_features, scale, bias, false, isa, threads)};
    };
  }
  if (kind == "real_binary_linear") {
    expect(5);  // masks, out_features, scale, bias, isa
    const torch::Tensor masks = program_arg<torch::Tensor>(a, 0);
    const int64_t out_features = program_arg<int64_t>(a, 1);
    const auto scale = program_tensor(a, 2), bias = program_tensor(a, 3);
    const int64_t isa = program_arg<int64_t>(a, 4);
    return [=](const bnas::ProgramInputs& env, int64_t) {
      return bnas::ProgramValue{real_binary_linear(program_input(env, x), masks, out_features, scale, bias, isa)};
    };
  }
  if (kind == "global_avg_pool_nhwc") {
    expect(0);
    return [=](const bnas::ProgramInputs& env, int64_t threads) {
      return bnas::ProgramValue{global_avg_pool_nhwc(program_input(env, x), threads)};
    };
  }
  if (kind == "linear_rows") {
    expect(2);  // weight, bias
    const torch::Tensor w = program_arg<torch::Tensor>(a, 0);
    const auto bias = program_tensor(a, 1);
    return [=](const bnas::ProgramInputs& env, int64_t threads) {
      return bnas::ProgramValue{linear_rows(program_input(env, x), w, bias, threads)};
    };
  }
  TORCH_CHECK(false, "ProgramRunner: no kernel call of kind '", kind, "'");
}

}  // namespace
