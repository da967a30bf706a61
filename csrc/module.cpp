// weakseg._C: a Python module with no Python functions of its own. Importing
// it runs the static registrations of every op in the `weakseg` torch library.
#include <Python.h>
#include <torch/library.h>

#ifndef WEAKSEG_WITH_CUDA
#define WEAKSEG_WITH_CUDA 0
#endif

namespace {
bool built_with_cuda() { return WEAKSEG_WITH_CUDA != 0; }
}  // namespace

TORCH_LIBRARY(weakseg, m) {
  // Build facts, for `weakseg info`.
  m.def("_built_with_cuda() -> bool", &built_with_cuda);
}

static struct PyModuleDef weakseg_c_module = {PyModuleDef_HEAD_INIT, "_C", "weakseg compiled ops", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&weakseg_c_module); }
