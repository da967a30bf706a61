// Included by the emulator's op translation units before the op sources: the
// op's own registrations (TORCH_LIBRARY_FRAGMENT(weakseg, ...) and
// TORCH_LIBRARY_IMPL(weakseg, CPU|CUDA, ...)) become unused functions, so that
// weakseg._C_emu registers nothing in the real `weakseg` namespace. Its ops are
// registered under `weakseg_emu` by csrc/emu/module.cpp.
#pragma once
#include <torch/library.h>

#undef TORCH_LIBRARY_FRAGMENT
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_FRAGMENT(ns, m) [[maybe_unused]] static void ws_emu_unregistered_##ns(torch::Library& m)
#define TORCH_LIBRARY_IMPL(ns, k, m) [[maybe_unused]] static void ws_emu_unregistered_##ns##_##k(torch::Library& m)
