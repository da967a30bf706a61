// weakseg._C_emu: the CUDA launchers of every op (csrc/ops/cuda/*.cu) and the
// kernels they launch, executed on the CPU by the emulator (cuda_emu.h), as
// ops of their own namespace `weakseg_emu` (CPU tensors in, CPU tensors out).
// A test and debugging tool: nothing is registered in `weakseg`.
#include <Python.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "csrc/emu/cuda_emu.h"

namespace weakseg {
namespace ops {
// Defined in csrc/ops/cuda/*.cu.
at::Tensor erode_cuda(const at::Tensor& mask, c10::IntArrayRef kernel_size, int64_t iterations);
at::Tensor erode_labels_cuda(const at::Tensor& labels, c10::IntArrayRef kernel_size, int64_t iterations,
                             int64_t ignore_index);
std::tuple<at::Tensor, at::Tensor> masked_area_pool_cuda(const at::Tensor& features, const at::Tensor& masks,
                                                         bool normalize);
std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_vote_cuda(const at::Tensor& queries, const at::Tensor& bank,
                                                             const at::Tensor& bank_labels, int64_t k,
                                                             int64_t num_classes);
at::Tensor refine_propagate_cuda(const at::Tensor& attn, const at::Tensor& maps, double ent, int64_t steps);
at::Tensor refine_propagate_qk_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& maps, double ent,
                                    int64_t steps, double scale);
std::tuple<at::Tensor, at::Tensor> kl_kmeans_cuda(const at::Tensor& x, const at::Tensor& seeds, int64_t iterations);
}  // namespace ops
}  // namespace weakseg

namespace {
void configure(std::string mode, int64_t seed) { emu::configure(mode, seed); }
// launches, blocks, threads, barriers, shuffles since the last reset.
std::vector<int64_t> stats() {
  const auto s = emu::stats();
  return {s.launches, s.blocks, s.threads, s.barriers, s.shuffles};
}
void reset_stats() { emu::reset_stats(); }
}  // namespace

TORCH_LIBRARY(weakseg_emu, m) {
  // The schemas of csrc/ops/*.cpp.
  m.def("erode(Tensor mask, int[2] kernel_size, int iterations=1) -> Tensor");
  m.def("erode_labels(Tensor labels, int[2] kernel_size, int iterations=1, int ignore_index=255) -> Tensor");
  m.def("masked_area_pool(Tensor features, Tensor masks, bool normalize=True) -> (Tensor, Tensor)");
  m.def("knn_vote(Tensor queries, Tensor bank, Tensor bank_labels, int k, int num_classes) -> (Tensor, Tensor, Tensor)");
  m.def("refine_propagate(Tensor attn, Tensor maps, float ent, int steps) -> Tensor");
  m.def("refine_propagate_qk(Tensor q, Tensor k, Tensor maps, float ent, int steps, float scale) -> Tensor");
  m.def("kl_kmeans(Tensor x, Tensor seeds, int iterations) -> (Tensor, Tensor)");
  // The emulator: mode 'fibers' or 'threads', seed of the block / thread orders.
  m.def("configure(str mode, int seed) -> ()", &configure);
  m.def("stats() -> int[]", &stats);
  m.def("reset_stats() -> ()", &reset_stats);
}

TORCH_LIBRARY_IMPL(weakseg_emu, CPU, m) {
  using namespace weakseg::ops;
  m.impl("erode", &erode_cuda);
  m.impl("erode_labels", &erode_labels_cuda);
  m.impl("masked_area_pool", &masked_area_pool_cuda);
  m.impl("knn_vote", &knn_vote_cuda);
  m.impl("refine_propagate", &refine_propagate_cuda);
  m.impl("refine_propagate_qk", &refine_propagate_qk_cuda);
  m.impl("kl_kmeans", &kl_kmeans_cuda);
}

static struct PyModuleDef weakseg_c_emu_module = {PyModuleDef_HEAD_INIT, "_C_emu",
                                                  "weakseg CUDA kernels on the CPU emulator", -1, nullptr};

PyMODINIT_FUNC PyInit__C_emu(void) { return PyModule_Create(&weakseg_c_emu_module); }
