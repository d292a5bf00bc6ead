// The CPU extension's Python module: every kernel entry point, bound by name. The kernels:
//
//   binary_conv.h         XNOR-popcount convs and linear layers on packed words (the core)
//   grouped_conv.h        grouped binary convs of 1-8 channels a group on float maps
//   sign_packing.h        packing the signs of float maps and rows (against thresholds)
//   real_binary_linear.h  real inputs x 1-bit weights
//   float_pooling.h       channels_last max-pool and global average pool
//   float_kernel_calls.h  the float kernels of stem_conv.h, pointwise_conv.h, linear_rows.h
//   program_kernels.h     the calls a ProgramRunner (program_runner.h) replays
#include <torch/extension.h>

#include "binary_conv.h"
#include "float_kernel_calls.h"
#include "float_pooling.h"
#include "grouped_conv.h"
#include "program_kernels.h"
#include "real_binary_linear.h"
#include "sign_packing.h"


PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bnas XNOR-popcount CPU kernels";
  m.attr("ISA_POPCNT") = static_cast<int>(ISA_POPCNT);
  m.attr("ISA_AVX2") = static_cast<int>(ISA_AVX2);
  m.attr("ISA_AVX512") = static_cast<int>(ISA_AVX512);
  m.def("isa_supported", &isa_supported, "whether this CPU runs the given code path");
  m.def("lanes", [](int64_t isa) { return lanes_of(static_cast<int>(isa)); },
        "output channels per SIMD vector for a code path");
  m.def("repack_weights", &repack_weights, "packed conv weights -> the kernel's lane layout");
  m.def("conv2d_packed", &conv2d_packed, "XNOR-popcount conv2d on packed NHWC input");
  m.def("grouped_conv_fused", &grouped_conv_fused,
        "grouped binary conv of 1-16 channels a group on a float map (channels in SIMD lanes) with the fused "
        "epilogue; [float, packed]");
  m.def("conv2d_packed_fused", &conv2d_packed_fused,
        "XNOR-popcount conv2d with a residual input and float and/or packed outputs");
  m.def("linear_packed", &linear_packed, "XNOR-popcount linear on packed (N, words) input");
  m.def("repack_real_weights", &repack_real_weights,
        "packed (K, words) weights -> 16-channel masks for real_binary_linear");
  m.def("real_binary_linear", &real_binary_linear,
        "real input x 1-bit weights linear layer, * scale + bias");
  m.def("max_pool2d_nhwc", &max_pool2d_nhwc,
        "max-pool of a channels_last float32 map (and its packed signs, with pack_output)");
  m.def("pointwise_conv_nhwc", &pointwise_conv_nhwc,
        "1x1 float conv of a channels_last map, optionally on its 2x2/2 average pool");
  m.def("int8_pointwise_conv_nhwc", &int8_pointwise_conv_nhwc,
        "1x1 conv of a channels_last map (optionally on its 2x2/2 average pool) in 8-bit integers");
  m.def("global_avg_pool_nhwc", &global_avg_pool_nhwc, "mean over the pixels of a channels_last float32 map: (N, C)");
  m.def("linear_rows", &linear_rows, "float linear layer x w^T + bias, weight rows split among threads");
  m.def("int8_supported", &int8_supported, "whether this CPU runs image_conv_nhwc on int8 weights (AVX-512 VNNI)");
  m.def("amx_int8_supported", &bnas::amx_int8_hardware,
        "whether this CPU and kernel run AMX-INT8 tiles (the int8 convs then use them)");
  m.def("amx_int8_enabled", &bnas::amx_int8_available,
        "whether the int8 convs use AMX tiles now (the CPU and kernel have them, and the switch is on)");
  m.def("set_amx_int8_enabled", [](bool enabled) { return bnas::amx_int8_switch().exchange(enabled); },
        "let the int8 convs use AMX (default; BNAS_AMX=0 turns it off) or not; returns the previous setting");
  m.def("image_conv_nhwc", &image_conv_nhwc,
        "float conv of an image, float32 or int8 (per-image uint8 image, or on a given pixel grid; per-channel "
        "int8 weights), optionally with the max-pool after it and the pooled map's packed signs");
  m.def("pack_signs", &pack_signs,
        "float NCHW (or (N, F)) -> packed NHWC sign bits: x >= 0, or x >= a threshold per channel");
  bnas::bind_work_pool(m);
  auto still_held = [](const py::list& held) {
    // each (dict, name, object): dict.get(name) is object (a module's parameter or buffer
    // still the tensor a call was bound to); in C, as a forward's Python is slow cold
    for (const py::handle item : held) {
      PyObject* entry = item.ptr();
      if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 3 || !PyDict_Check(PyTuple_GET_ITEM(entry, 0)))
        throw py::type_error("still_held takes (dict, name, object) tuples");
      PyObject* now = PyDict_GetItemWithError(PyTuple_GET_ITEM(entry, 0), PyTuple_GET_ITEM(entry, 1));
      if (now == nullptr && PyErr_Occurred()) throw py::error_already_set();
      if ((now == nullptr ? Py_None : now) != PyTuple_GET_ITEM(entry, 2)) return false;
    }
    return true;
  };
  py::class_<bnas::ProgramRunner>(m, "ProgramRunner",
                                  "a lowered packed network's kernel calls, replayed without Python between them")
      .def(py::init<int64_t>(), py::arg("slots"))
      .def(
          "kernel",
          [](bnas::ProgramRunner& runner, int64_t out, const std::string& kind, std::vector<int64_t> inputs,
             const py::tuple& args, int64_t take, std::vector<int64_t> drops) {
            runner.add(out, program_kernel(kind, inputs, args, take), std::move(drops));
          },
          "value `out` = the kernel call `kind` on the values in `inputs`, with `args`; then drop `drops`")
      .def("getitem", &bnas::ProgramRunner::getitem, "value `out` = one tensor of the pair in `source`")
      .def("set_output", &bnas::ProgramRunner::set_output)
      .def("remember", &bnas::ProgramRunner::remember, py::arg("x"), py::arg("at_most"),
           "run inputs of x's dtype, device, sizes and strides from now on (at most `at_most` layouts)")
      .def("known_inputs", &bnas::ProgramRunner::known_inputs)
      .def("known", &bnas::ProgramRunner::known, "whether inputs of x's layout run here")
      .def_static("still_held", still_held, "whether, for each (dict, name, object) tuple, dict.get(name) is object")
      .def("watch_versions", &bnas::ProgramRunner::watch_versions,
           "[(tensor, version)]: the tensors versions_unchanged checks")
      .def("versions_unchanged", &bnas::ProgramRunner::versions_unchanged)
      .def(
          "run",
          [](const bnas::ProgramRunner& runner, const torch::Tensor& x, int64_t threads) {
            py::gil_scoped_release released;
            return runner.run(x, threads, nullptr);
          },
          "the program's output for x")
      .def(
          "run_known",
          [](const bnas::ProgramRunner& runner, const torch::Tensor& x, int64_t threads) -> py::object {
            if (!runner.known(x)) return py::none();
            torch::Tensor out;
            {
              py::gil_scoped_release released;
              out = runner.run(x, threads, nullptr);
            }
            return py::cast(out);
          },
          "the program's output for x, or None for an input layout not remembered")
      .def(
          "run_timed",
          [](const bnas::ProgramRunner& runner, const torch::Tensor& x, int64_t threads) {
            std::vector<double> seconds;
            torch::Tensor out;
            {
              py::gil_scoped_release released;
              out = runner.run(x, threads, &seconds);
            }
            return std::make_pair(out, seconds);
          },
          "(output, each instruction's seconds)");
}
