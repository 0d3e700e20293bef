// Every op of qamw_ext, declared once. Kernels are registered per device in the
// family's own file (hadamard.cpp, codebook.cpp, bitpack.cpp, qamw.cpp, aaac.cpp);
// fake (meta) implementations live in qamw_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(qamw_ext, m) {
  m.def("hadamard(Tensor x, int block_size, Tensor? signs=None, bool inverse=False) -> Tensor");
  m.def("nearest_codeword_2d(Tensor points, Tensor codebook) -> Tensor");
  m.def("nearest_codeword_1d(Tensor values, Tensor codebook) -> Tensor");
  m.def("pack_bits(Tensor codes, int bits) -> Tensor");
  m.def("unpack_bits(Tensor packed, int bits, int count) -> Tensor");
  m.def(
      "qamw_gemv(Tensor x, Tensor packed, Tensor codebook, Tensor row_scale, "
      "Tensor? channel_scale, Tensor? signs, int bits, int block_size, int[]? sibling_rows=None) "
      "-> Tensor");
  m.def(
      "qamw_dequantize(Tensor packed, Tensor codebook, Tensor row_scale, Tensor? channel_scale, "
      "Tensor? signs, int bits, int block_size, int in_features, ScalarType dtype, "
      "int[]? sibling_rows=None) -> Tensor");
  m.def(
      "aaac_gemv(Tensor x, Tensor packed, Tensor scales, Tensor codebooks, Tensor? tensor_scale, "
      "Tensor? channel_scale, int group_size, int[]? sibling_rows=None) -> Tensor");
  m.def(
      "aaac_dequantize(Tensor packed, Tensor scales, Tensor codebooks, Tensor? tensor_scale, "
      "Tensor? channel_scale, int group_size, ScalarType dtype, int[]? sibling_rows=None) -> Tensor");
}

// `import qamw_ext._C` only has to load this library so the registrations above run.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
