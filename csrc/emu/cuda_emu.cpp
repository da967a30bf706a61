// The block executor of the CUDA emulator (see cuda_emu.h for what it runs and
// what it cannot see). One grid at a time (a global lock), one block at a
// time; the CUDA threads of a block are fibers or OS threads. Both modes share
// one state machine: every thread is Running, waiting at a block barrier,
// waiting at a warp shuffle, or Done; `resolve` releases complete rendezvous
// and reports divergence when no thread can make progress.
#include "csrc/emu/cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

namespace emu {
namespace detail {

thread_local Thread* current = nullptr;

namespace {

enum class St : uint8_t { Running, Barrier, Warp, Done };

struct Abort {};  // unwinds a CUDA thread after an error in its block

struct TState {
  St st = St::Running;
  const char* file = nullptr;  // barrier site
  int line = 0;                // barrier or shuffle site
  int parity = 0;              // double buffer of the warp exchange
  std::condition_variable cv;  // threads mode
  ucontext_t uc;               // fibers mode
};

struct Warp {
  int lanes = 0, at = 0, done = 0;
  uint64_t slot[2][32];
};

constexpr size_t kStack = 256 * 1024;

struct Emu {
  std::mutex launch_mu;  // one grid at a time
  std::mutex mu;         // the state of the running block
  bool fibers = true;
  uint64_t seed = 0;
  std::mt19937_64 rng{0};
  Stats stats;

  // the running block
  Block blk;
  int n = 0;
  std::vector<Thread> threads;
  std::vector<std::unique_ptr<TState>> ts;
  std::vector<Warp> warps;
  int n_running = 0, n_barrier = 0, n_done = 0;
  std::string error;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;

  // fibers
  ucontext_t sched;
  std::vector<void*> stacks;

  // threads
  std::vector<std::thread> workers;
  uint64_t job = 0;
  std::condition_variable start_cv, done_cv;

  Emu() {
    if (const char* m = std::getenv("WEAKSEG_EMU_MODE")) fibers = std::string(m) != "threads";
    if (const char* s = std::getenv("WEAKSEG_EMU_SEED")) seed = std::strtoull(s, nullptr, 10);
    rng.seed(seed);
  }
};

Emu& E() {
  static Emu* e = new Emu();  // never destroyed: worker threads may outlive static destruction
  return *e;
}

std::string site(const char* file, int line) {
  std::string f = file ? file : "?";
  const auto p = f.find("kernels/");
  return (p == std::string::npos ? f : f.substr(p)) + ":" + std::to_string(line);
}

// Record the first error of the block and wake every waiting thread (lock held).
void set_error(Emu& e, const std::string& msg) {
  if (e.error.empty()) e.error = msg;
  if (!e.fibers)
    for (auto& t : e.ts) t->cv.notify_one();
}

void release(Emu& e, int i) {
  e.ts[i]->st = St::Running;
  ++e.n_running;
  if (!e.fibers) e.ts[i]->cv.notify_one();
}

// Release what can be released; with no thread running and nothing released,
// the block is stuck: report why (lock held).
void resolve(Emu& e) {
  bool released = false;
  for (size_t w = 0; w < e.warps.size(); ++w) {
    Warp& wp = e.warps[w];
    if (wp.at == 0 || wp.at != wp.lanes) continue;
    const int l0 = static_cast<int>(w) * 32;
    for (int l = l0; l < l0 + wp.lanes; ++l) {
      if (e.ts[l]->line != e.ts[l0]->line) {
        set_error(e, "lanes of warp " + std::to_string(w) + " wait at different shuffles (lines " +
                         std::to_string(e.ts[l0]->line) + " and " + std::to_string(e.ts[l]->line) + ")");
        return;
      }
    }
    for (int l = l0; l < l0 + wp.lanes; ++l) release(e, l);
    wp.at = 0;
    ++e.stats.shuffles;
    released = true;
  }
  if (e.n_barrier > 0 && e.n_barrier + e.n_done == e.n) {
    int first = -1;
    for (int i = 0; i < e.n; ++i) {
      if (e.ts[i]->st != St::Barrier) continue;
      if (first < 0) {
        first = i;
      } else if (e.ts[i]->line != e.ts[first]->line || e.ts[i]->file != e.ts[first]->file) {
        set_error(e, "threads wait at different __syncthreads: thread " + std::to_string(first) + " at " +
                         site(e.ts[first]->file, e.ts[first]->line) + ", thread " + std::to_string(i) + " at " +
                         site(e.ts[i]->file, e.ts[i]->line));
        return;
      }
    }
    if (e.n_done > 0) {
      set_error(e, std::to_string(e.n_done) + " thread(s) returned while " + std::to_string(e.n_barrier) +
                       " wait at __syncthreads (" + site(e.ts[first]->file, e.ts[first]->line) + ")");
      return;
    }
    for (int i = 0; i < e.n; ++i) release(e, i);
    e.n_barrier = 0;
    ++e.stats.barriers;
    released = true;
  }
  if (released || e.n_running > 0 || e.n_done == e.n) return;
  // Stuck: nobody runs, nothing completes.
  for (size_t w = 0; w < e.warps.size(); ++w) {
    const Warp& wp = e.warps[w];
    if (wp.at > 0 && wp.done > 0) {
      set_error(e, "a lane of warp " + std::to_string(w) + " returned while " + std::to_string(wp.at) +
                       " lanes wait at a shuffle");
      return;
    }
  }
  std::ostringstream os;
  os << "divergence: " << e.n_barrier << " thread(s) wait at __syncthreads while others wait at a shuffle";
  for (int i = 0; i < e.n; ++i) {
    if (e.ts[i]->st == St::Warp) {
      os << " (thread " << i << " at line " << e.ts[i]->line << ")";
      break;
    }
  }
  set_error(e, os.str());
}

// Block the calling CUDA thread in state `st` until it is released; throws
// Abort when the block failed meanwhile.
void wait(Emu& e, std::unique_lock<std::mutex>& lk, int i) {
  --e.n_running;
  if (e.fibers) {
    lk.unlock();
    swapcontext(&e.ts[i]->uc, &e.sched);
    lk.lock();
  } else {
    resolve(e);
    e.ts[i]->cv.wait(lk, [&] { return e.ts[i]->st == St::Running || !e.error.empty(); });
  }
  if (!e.error.empty()) throw Abort{};
}

void run_thread(Emu& e, int i) {
  current = &e.threads[i];
  {
    std::lock_guard<std::mutex> lk(e.mu);
    if (!e.error.empty()) return;
  }
  try {
    e.body(e.ctx);
  } catch (const Abort&) {
  } catch (const std::exception& ex) {
    std::lock_guard<std::mutex> lk(e.mu);
    set_error(e, std::string("thread ") + std::to_string(i) + " threw: " + ex.what());
  }
}

void finish_thread(Emu& e, int i) {  // lock held
  e.ts[i]->st = St::Done;
  --e.n_running;
  ++e.n_done;
  ++e.warps[i / 32].done;
}

// ---- fibers ------------------------------------------------------------------
int g_fiber = -1;

void fiber_entry() {
  Emu& e = E();
  const int i = g_fiber;
  run_thread(e, i);
  std::lock_guard<std::mutex> lk(e.mu);
  finish_thread(e, i);
  // returns to e.sched through uc_link
}

void* fiber_stack(Emu& e, int i) {
  while (static_cast<int>(e.stacks.size()) <= i) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "weakseg CUDA emulator: cannot map a fiber stack");
    mprotect(p, page, PROT_NONE);  // guard page: a stack overflow faults
    e.stacks.push_back(static_cast<char*>(p) + page);
  }
  return e.stacks[i];
}

void run_block_fibers(Emu& e) {
  for (int i = 0; i < e.n; ++i) {
    ucontext_t& uc = e.ts[i]->uc;
    getcontext(&uc);
    uc.uc_stack.ss_sp = fiber_stack(e, i);
    uc.uc_stack.ss_size = kStack;
    uc.uc_link = &e.sched;
    makecontext(&uc, fiber_entry, 0);
  }
  std::vector<int> order;
  std::unique_lock<std::mutex> lk(e.mu);
  while (e.n_done < e.n) {
    order.clear();
    for (int i = 0; i < e.n; ++i)
      if (e.ts[i]->st == St::Running || (!e.error.empty() && e.ts[i]->st != St::Done)) order.push_back(i);
    std::shuffle(order.begin(), order.end(), e.rng);
    for (int i : order) {
      if (e.ts[i]->st == St::Done) continue;
      if (e.ts[i]->st != St::Running) {  // aborting: let it unwind
        e.ts[i]->st = St::Running;
        ++e.n_running;
      }
      g_fiber = i;
      current = &e.threads[i];  // threadIdx of the fiber being resumed
      lk.unlock();
      swapcontext(&e.sched, &e.ts[i]->uc);
      lk.lock();
    }
    if (e.error.empty()) resolve(e);
  }
}

// ---- OS threads ---------------------------------------------------------------
void worker(int i) {
  Emu& e = E();
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lk(e.mu);
  for (;;) {
    e.start_cv.wait(lk, [&] { return e.job != seen && i < e.n; });
    seen = e.job;
    const uint64_t h = (e.seed + 0x9E3779B97F4A7C15ull * (seen * 1315423911ull + i)) >> 61;  // 0..7
    lk.unlock();
    for (uint64_t y = 0; y < h; ++y) std::this_thread::yield();  // randomised start
    run_thread(e, i);
    lk.lock();
    finish_thread(e, i);
    resolve(e);
    if (e.n_done == e.n) e.done_cv.notify_one();
  }
}

void run_block_threads(Emu& e) {
  std::unique_lock<std::mutex> lk(e.mu);
  while (static_cast<int>(e.workers.size()) < e.n) {
    e.workers.emplace_back(worker, static_cast<int>(e.workers.size()));
    e.workers.back().detach();
  }
  ++e.job;
  e.start_cv.notify_all();
  e.done_cv.wait(lk, [&] { return e.n_done == e.n; });
}

}  // namespace

unsigned char* dynamic_smem() { return E().blk.dyn_smem; }

void syncthreads(const char* file, int line) {
  Emu& e = E();
  const int i = current->linear;
  std::unique_lock<std::mutex> lk(e.mu);
  TState& t = *e.ts[i];
  t.st = St::Barrier;
  t.file = file;
  t.line = line;
  ++e.n_barrier;
  wait(e, lk, i);
}

uint64_t warp_exchange(uint64_t mine, int src, unsigned int mask, int line) {
  Emu& e = E();
  const int i = current->linear;
  std::unique_lock<std::mutex> lk(e.mu);
  Warp& w = e.warps[i / 32];
  if (mask != 0xffffffffu || w.lanes != 32) {
    set_error(e, "shuffle at line " + std::to_string(line) +
                     ": only full warps with the full mask are emulated (mask " + std::to_string(mask) + ", " +
                     std::to_string(w.lanes) + " lanes)");
    throw Abort{};
  }
  TState& t = *e.ts[i];
  const int p = t.parity;
  t.parity ^= 1;
  w.slot[p][i & 31] = mine;
  t.st = St::Warp;
  t.line = line;
  ++w.at;
  wait(e, lk, i);
  return (src >= 0 && src < 32) ? w.slot[p][src] : mine;
}

void run_grid(const char* name, dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* ctx) {
  Emu& e = E();
  const int64_t nt = int64_t(block.x) * block.y * block.z;
  const int64_t nb = int64_t(grid.x) * grid.y * grid.z;
  TORCH_CHECK(nt >= 1 && nt <= 1024 && block.z <= 64, "weakseg CUDA emulator: ", name, ": invalid block (",
              block.x, ", ", block.y, ", ", block.z, ")");
  TORCH_CHECK(nb >= 1 && grid.x < (1u << 31) && grid.y <= 65535 && grid.z <= 65535, "weakseg CUDA emulator: ", name,
              ": invalid grid (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  TORCH_CHECK(smem <= 48 * 1024, "weakseg CUDA emulator: ", name, ": ", smem,
              " bytes of dynamic shared memory exceed the default 48 KiB limit");
  std::lock_guard<std::mutex> launch(e.launch_mu);
  ++e.stats.launches;
  std::vector<unsigned char> dyn(smem);
  std::vector<int64_t> order(static_cast<size_t>(nb));
  for (int64_t b = 0; b < nb; ++b) order[b] = b;
  std::shuffle(order.begin(), order.end(), e.rng);

  const int n = static_cast<int>(nt);
  e.threads.assign(n, Thread{});
  e.ts.clear();
  for (int i = 0; i < n; ++i) e.ts.emplace_back(new TState());
  e.warps.assign((n + 31) / 32, Warp{});
  for (size_t w = 0; w < e.warps.size(); ++w) e.warps[w].lanes = std::min(32, n - static_cast<int>(w) * 32);
  for (int i = 0; i < n; ++i) {
    e.threads[i].linear = i;
    e.threads[i].idx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    e.threads[i].block = &e.blk;
  }
  e.body = body;
  e.ctx = ctx;
  for (int64_t b : order) {
    {
      std::lock_guard<std::mutex> lk(e.mu);
      e.blk.bidx = dim3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                            static_cast<unsigned>(b / (int64_t(grid.x) * grid.y)));
      e.blk.bdim = block;
      e.blk.gdim = grid;
      std::fill(dyn.begin(), dyn.end(), 0xFF);  // shared memory starts as garbage
      e.blk.dyn_smem = dyn.empty() ? nullptr : dyn.data();
      for (auto& t : e.ts) {
        t->st = St::Running;
        t->parity = 0;
      }
      for (auto& w : e.warps) w.at = w.done = 0;
      e.n = n;
      e.n_running = n;
      e.n_barrier = e.n_done = 0;
      e.error.clear();
      ++e.stats.blocks;
      e.stats.threads += n;
    }
    if (e.fibers)
      run_block_fibers(e);
    else
      run_block_threads(e);
    std::lock_guard<std::mutex> lk(e.mu);
    e.n = 0;  // idle workers stay asleep
    TORCH_CHECK(e.error.empty(), "weakseg CUDA emulator: kernel ", name, ", block (", e.blk.bidx.x, ", ",
                e.blk.bidx.y, ", ", e.blk.bidx.z, "): ", e.error);
  }
}

}  // namespace detail

void configure(const std::string& mode, int64_t seed) {
  TORCH_CHECK(mode == "fibers" || mode == "threads", "weakseg CUDA emulator: mode must be 'fibers' or 'threads', got '",
              mode, "'");
  auto& e = detail::E();
  std::lock_guard<std::mutex> launch(e.launch_mu);
  e.fibers = mode == "fibers";
  e.seed = static_cast<uint64_t>(seed);
  e.rng.seed(e.seed);
}

Stats stats() {
  auto& e = detail::E();
  std::lock_guard<std::mutex> launch(e.launch_mu);
  return e.stats;
}

void reset_stats() {
  auto& e = detail::E();
  std::lock_guard<std::mutex> launch(e.launch_mu);
  e.stats = Stats{};
}

}  // namespace emu
