// A lowered packed network (bnas.export.program) replayed in C++: the same kernel calls with
// the same arguments, in the same order, without a Python frame, argument conversion or check
// between them. In the Python program each call costs several microseconds beside its kernel,
// most of it with the caches cold from the kernel before (about a sixth of a Bi-Real
// ResNet-18 forward at 224x224 on two threads), and that time does not shrink with threads.
//
// The runner knows nothing of the kernels: each instruction is a function of the values before
// it and the thread count (xnor_cpu.cpp makes them, one kind per kernel entry point). A value
// is a tensor or a pair of tensors (a call that returns a float map and its packed signs);
// `getitem` takes one of a pair. A value is dropped after its last use, as in Python.
#pragma once

#include <torch/extension.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

namespace bnas {

struct ProgramValue {
  torch::Tensor first, second;  // second: only in a pair
  bool pair = false;
};

using ProgramInputs = std::vector<ProgramValue>;
using ProgramFunction = std::function<ProgramValue(const ProgramInputs& env, int64_t threads)>;

// What the functions of an instruction kind share: the tensor in a value slot, and the
// arguments Python bound (a tensor or None, an int or None).
inline const torch::Tensor& program_input(const ProgramInputs& env, int64_t slot) {
  const ProgramValue& v = env[static_cast<size_t>(slot)];
  TORCH_CHECK(!v.pair && v.first.defined(), "ProgramRunner: input ", slot, " is not a tensor");
  return v.first;
}

inline c10::optional<torch::Tensor> program_tensor(const pybind11::tuple& args, size_t i) {
  if (args[i].is_none()) return c10::nullopt;
  return args[i].cast<torch::Tensor>();
}

// PyTorch's conv of an image made channels_last first, as the stems call it without their
// AVX-512 kernel (bnas.export.plan.ImageConv2d's small stem, bnas.kernels.image_conv2d and
// conv2d_max_pool elsewhere).
inline torch::Tensor channels_last_conv2d(const torch::Tensor& image, const torch::Tensor& weight,
                                          const c10::optional<torch::Tensor>& bias, at::IntArrayRef stride,
                                          at::IntArrayRef padding) {
  return at::conv2d(image.contiguous(at::MemoryFormat::ChannelsLast), weight, bias, stride, padding);
}

inline c10::optional<int64_t> program_optional_int(const pybind11::handle& value) {
  if (value.is_none()) return c10::nullopt;
  return value.cast<int64_t>();
}

class ProgramRunner {
 public:
  explicit ProgramRunner(int64_t slots) : slots_(slots) {
    TORCH_CHECK(slots >= 2, "ProgramRunner: a program has an input and at least one value");
  }

  // value `out` = function(values before it, threads); then the values in `drops` are released
  void add(int64_t out, ProgramFunction function, std::vector<int64_t> drops) {
    TORCH_CHECK(out > last_out_ && out < slots_, "ProgramRunner: instruction ", out, " out of order");
    for (int64_t slot : drops) TORCH_CHECK(slot >= 0 && slot <= out, "ProgramRunner: bad drop ", slot);
    instructions_.push_back({out, std::move(function), std::move(drops)});
    last_out_ = out;
  }

  void getitem(int64_t out, int64_t source, int64_t index, std::vector<int64_t> drops) {
    TORCH_CHECK(source >= 0 && source < out && (index == 0 || index == 1), "ProgramRunner: bad getitem");
    add(
        out,
        [source, index](const ProgramInputs& env, int64_t) {
          const ProgramValue& v = env[static_cast<size_t>(source)];
          TORCH_CHECK(v.pair, "ProgramRunner: getitem on a value that is not a pair");
          return ProgramValue{index == 0 ? v.first : v.second, torch::Tensor(), false};
        },
        std::move(drops));
  }

  void set_output(int64_t slot) {
    TORCH_CHECK(slot >= 0 && slot < slots_, "ProgramRunner: bad output slot");
    output_ = slot;
  }

  // Inputs whose every later value has the shape and layout the calls were bound for (the
  // caller has seen them run through without a fallback): dtype, device, sizes and strides.
  bool known(const torch::Tensor& x) const {
    for (const InputLayout& layout : known_)
      if (layout.matches(x)) return true;
    return false;
  }
  void remember(const torch::Tensor& x, size_t at_most) {
    if (!known(x) && known_.size() < at_most) known_.push_back(InputLayout::of(x));
  }
  size_t known_inputs() const { return known_.size(); }

  // The tensors whose layouts the calls hold must be unchanged in place: each with its version
  // when bound (a tensor's version counts its in-place changes).
  void watch_versions(std::vector<std::pair<torch::Tensor, int64_t>> tensors) { versions_ = std::move(tensors); }
  bool versions_unchanged() const {
    for (const auto& [tensor, version] : versions_)
      if (static_cast<int64_t>(tensor._version()) != version) return false;
    return true;
  }

  // The output for input `x`; with `seconds`, each instruction's wall time is appended to it.
  torch::Tensor run(const torch::Tensor& x, int64_t threads, std::vector<double>* seconds) const {
    TORCH_CHECK(output_ >= 0, "ProgramRunner: no output set");
    at::NoGradGuard no_grad;
    ProgramInputs env(static_cast<size_t>(slots_));
    env[0].first = x;
    using Clock = std::chrono::steady_clock;
    for (const Instruction& instruction : instructions_) {
      const Clock::time_point start = seconds ? Clock::now() : Clock::time_point();
      env[static_cast<size_t>(instruction.out)] = instruction.function(env, threads);
      for (int64_t slot : instruction.drops) env[static_cast<size_t>(slot)] = ProgramValue();
      if (seconds) seconds->push_back(std::chrono::duration<double>(Clock::now() - start).count());
    }
    const ProgramValue& result = env[static_cast<size_t>(output_)];
    TORCH_CHECK(!result.pair, "ProgramRunner: the output is a pair");
    return result.first;
  }

 private:
  struct InputLayout {
    c10::ScalarType dtype;
    c10::Device device;
    std::vector<int64_t> sizes, strides;
    static InputLayout of(const torch::Tensor& x) {
      return {x.scalar_type(), x.device(), x.sizes().vec(), x.strides().vec()};
    }
    bool matches(const torch::Tensor& x) const {
      return x.scalar_type() == dtype && x.device() == device && x.sizes().equals(sizes) &&
             x.strides().equals(strides);
    }
  };
  struct Instruction {
    int64_t out;
    ProgramFunction function;
    std::vector<int64_t> drops;
  };
  int64_t slots_;
  int64_t last_out_ = 0;
  int64_t output_ = -1;
  std::vector<Instruction> instructions_;
  std::vector<InputLayout> known_;
  std::vector<std::pair<torch::Tensor, int64_t>> versions_;
};

}  // namespace bnas
