// Where the CPU kernels' threads come from: torch's OpenMP team, or a pool of bnas's own.
//
// By default a kernel call runs on as many threads as torch's float ops (kernel_threads() in
// cpu_backend.py) and on torch's own OpenMP team: after each float op of a packed network
// libgomp's threads spin, so they take up a kernel's work at once, and a second set of threads
// would only compete with them for the cores (benchmarks/packed_threads.py on a 2-core machine,
// Bi-Real ResNet-18 at 224x224, 2 threads over 1: 1.65x on torch's team, 1.32x with the
// kernels on the pool below).
//
// With BNAS_KERNEL_THREADS set, the kernels run on the persistent pool below instead. A
// parallel region ends in a barrier that waits for every thread of the team, started or not;
// on a shared machine the OS often deschedules one team thread and the whole call waits for
// it (2 cores, one busy neighbour: ~32 ms per packed-model call instead of 3-10 ms). In the
// pool the calling thread always works. Helper threads take chunks of items from one atomic
// counter; the caller returns as soon as every item is done. It waits only for chunks a
// helper has already claimed (and is running), never for a helper that has not claimed one:
// a helper that wakes up late finds its generation finished and goes back to sleep. Helpers
// spin for up to 0.5 ms after a job, yielding the core to anything else runnable (kernel calls
// come in quick succession), then sleep on a condition variable. Keeping torch on 1 thread
// with BNAS_KERNEL_THREADS=2 thus keeps a packed network off every barrier.
//
// Results do not depend on the thread count or the team as long as every item writes its own
// outputs (where items share packed words the kernels OR them atomically).
#pragma once

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstdint>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace bnas {

class WorkPool {
 public:
  using Body = void (*)(void* ctx, int64_t begin, int64_t end);

  // More helpers than this are never started (the thread count comes from the user).
  static constexpr int kMaxThreads = 256;
  // How long an idle helper spins before it sleeps, and the caller before it sleeps while a
  // helper finishes a claimed chunk. A packed network's kernel calls are separated by float
  // ops of 0.1-0.5 ms; a helper woken from sleep comes too late for a call that short (measured
  // in Bi-Real ResNet-18, kernels on 2 threads, torch on 1: the convs took 0.85 ms per forward
  // spinning 50 us, 0.82 ms spinning 500 us, 1.0 ms not spinning, 1.23 ms on 1 thread). The
  // spin yields the core (sched_yield) to anything else runnable on it.
  static constexpr int64_t kHelperSpinNs = 500'000;
  static constexpr int64_t kCallerSpinNs = 100'000;

  // The process's pool (a fresh one in a forked child: the parent's helpers do not exist there).
  static WorkPool& get() {
    static std::once_flag once;
    std::call_once(once, [] {
      instance() = new WorkPool();  // never freed: helpers may still sleep on it at exit
      pthread_atfork(nullptr, nullptr, [] { instance() = new WorkPool(); });
    });
    return *instance();
  }

  // Runs body(ctx, begin, end) over [0, items) in chunks of at most `chunk` items, on up to
  // `threads` threads including the caller. A second caller while a job runs (another
  // Python thread, or a nested call) runs its job alone. The first exception thrown by any
  // chunk is rethrown here once every claimed chunk has finished; later chunks are skipped.
  void run(int64_t items, int64_t chunk, int threads, Body body, void* ctx) {
    if (items <= 0) return;
    chunk = std::max<int64_t>(1, chunk);
    threads = static_cast<int>(std::min<int64_t>({threads, kMaxThreads, (items + chunk - 1) / chunk}));
    if (threads <= 1 || items >= (int64_t{1} << 31) || busy_.exchange(true, std::memory_order_acquire)) {
      body(ctx, 0, items);
      return;
    }
    Job job{body, ctx, items, chunk, 0};
    int helpers = 0;
    {
      std::lock_guard<std::mutex> lk(mu_);
      start_helpers(threads - 1);
      helpers = helpers_;
      job.gen = ++gen_;
      job_ = job;
      slots_ = threads - 1;
      done_.store(0, std::memory_order_relaxed);
      failed_.store(false, std::memory_order_relaxed);
      error_ = nullptr;
      next_.store(static_cast<uint64_t>(job.gen) << 32, std::memory_order_relaxed);
      gen_seen_.store(job.gen, std::memory_order_release);
    }
    if (threads - 1 >= helpers)
      wake_.notify_all();
    else
      for (int i = 0; i < threads - 1; ++i) wake_.notify_one();
    work(job);
    wait_done(items);
    std::exception_ptr err;
    {
      std::lock_guard<std::mutex> lk(mu_);
      std::swap(err, error_);
    }
    busy_.store(false, std::memory_order_release);
    if (err) std::rethrow_exception(err);
  }

  // Test hook: helpers sleep this long between being woken and claiming work, as a helper
  // the OS does not schedule would. Off (0) unless a test sets it.
  void set_helper_start_delay_us(int64_t us) { delay_us_.store(us, std::memory_order_relaxed); }

  // Helper threads started so far, and chunks they ran (for tests).
  int helpers() {
    std::lock_guard<std::mutex> lk(mu_);
    return helpers_;
  }
  int64_t helper_chunks() const { return helper_chunks_.load(std::memory_order_relaxed); }

 private:
  struct Job {
    Body body;
    void* ctx;
    int64_t items, chunk;
    uint32_t gen;
  };

  static WorkPool*& instance() {
    static WorkPool* pool = nullptr;
    return pool;
  }

  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  // Called with mu_ held. A helper starts having seen the current generation, so it joins the
  // job about to be published. If the OS refuses a thread, the job runs on fewer.
  void start_helpers(int wanted) {
    while (helpers_ < wanted) {
      try {
        std::thread(&WorkPool::helper_main, this, gen_).detach();
      } catch (const std::system_error&) {
        return;
      }
      ++helpers_;
    }
  }

  // Claims the next chunk of generation `gen`; false once it has none left (or is over).
  bool claim(const Job& job, int64_t& begin, int64_t& end) {
    uint64_t s = next_.load(std::memory_order_relaxed);
    for (;;) {
      if (static_cast<uint32_t>(s >> 32) != job.gen) return false;
      const int64_t i = static_cast<int64_t>(s & 0xffffffffu);
      if (i >= job.items) return false;
      const int64_t j = std::min(job.items, i + job.chunk);
      const uint64_t t = (static_cast<uint64_t>(job.gen) << 32) | static_cast<uint64_t>(j);
      if (next_.compare_exchange_weak(s, t, std::memory_order_acquire, std::memory_order_relaxed)) {
        begin = i;
        end = j;
        return true;
      }
    }
  }

  // Runs chunks until none is left; returns how many it ran. Once a claim succeeds the caller
  // is still waiting for that chunk, so job.ctx is alive until done_ counts it.
  int64_t work(const Job& job) {
    int64_t begin = 0, end = 0, chunks = 0;
    while (claim(job, begin, end)) {
      if (!failed_.load(std::memory_order_relaxed)) {
        try {
          job.body(job.ctx, begin, end);
        } catch (...) {
          std::lock_guard<std::mutex> lk(mu_);
          if (!error_) error_ = std::current_exception();
          failed_.store(true, std::memory_order_relaxed);
        }
      }
      ++chunks;
      const int64_t n = end - begin;
      if (done_.fetch_add(n, std::memory_order_acq_rel) + n == job.items) {
        // The last chunk: wake the caller if it went to sleep (mu_ orders this after its check).
        std::lock_guard<std::mutex> lk(mu_);
        done_cv_.notify_all();
      }
    }
    return chunks;
  }

  void wait_done(int64_t items) {
    const auto finished = [&] { return done_.load(std::memory_order_acquire) == items; };
    if (spin_until(finished, kCallerSpinNs)) return;
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, finished);
  }

  // Spins until ready() or `ns` have passed: a few pauses, then sched_yield, so a thread
  // waiting on a busy machine lets the others on its core run (the helper it waits for,
  // perhaps) while it stays quick to react on an idle one.
  template <class Ready>
  static bool spin_until(const Ready& ready, int64_t ns) {
    for (int i = 0; i < 64; ++i) {
      if (ready()) return true;
      _mm_pause();
    }
    const int64_t until = now_ns() + ns;
    while (!ready()) {
      if (now_ns() > until) return false;
      sched_yield();
    }
    return true;
  }

  void helper_main(uint32_t seen) {
    for (;;) {
      spin_until([&] { return gen_seen_.load(std::memory_order_acquire) != seen; }, kHelperSpinNs);
      Job job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        wake_.wait(lk, [&] { return gen_ != seen; });
        seen = gen_;
        if (slots_ == 0) continue;  // enough helpers joined this job already
        --slots_;
        job = job_;
      }
      const int64_t delay = delay_us_.load(std::memory_order_relaxed);
      if (delay > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay));
      helper_chunks_.fetch_add(work(job), std::memory_order_relaxed);
    }
  }

  std::mutex mu_;
  std::condition_variable wake_;     // helpers sleep here between jobs
  std::condition_variable done_cv_;  // the caller sleeps here for claimed chunks
  Job job_{};                        // the current job; mu_
  uint32_t gen_ = 0;                 // its generation; mu_
  int slots_ = 0;                    // helpers it still takes; mu_
  int helpers_ = 0;                  // helper threads started; mu_
  std::exception_ptr error_;         // first exception of the current job; mu_
  std::atomic<uint32_t> gen_seen_{0};  // gen_, for spinning helpers
  std::atomic<uint64_t> next_{0};      // generation << 32 | next unclaimed item
  std::atomic<int64_t> done_{0};       // items finished in the current job
  std::atomic<bool> failed_{false};
  std::atomic<bool> busy_{false};
  std::atomic<int64_t> delay_us_{0};
  std::atomic<int64_t> helper_chunks_{0};
};

// The items of a range not yet claimed, [top, bottom), as top << 32 | bottom (ends below
// 2^32), claimed a chunk at a time from either end by any number of threads.
class TwoEndedRange {
 public:
  void reset(int64_t top, int64_t bottom) {
    rows_.store(static_cast<uint64_t>(top) << 32 | static_cast<uint64_t>(bottom), std::memory_order_relaxed);
  }
  // The next chunk [begin, end) from the top (or the bottom); false when none is left.
  // `guided`: near the middle a claim takes at most half of what is left, so the two threads
  // finish within about an item of each other, where a whole last chunk can leave one waiting
  // for a chunk's time (for a kernel whose chunks recompute no overlap: the stem's conv-pool
  // recomputes the conv rows two chunks share).
  bool claim(int64_t chunk, bool from_top, int64_t& begin, int64_t& end, bool guided = false) {
    uint64_t now = rows_.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t top = static_cast<int64_t>(now >> 32), bottom = static_cast<int64_t>(now & 0xffffffffu);
      if (top >= bottom) return false;
      const int64_t take = guided ? std::min(chunk, std::max<int64_t>(1, (bottom - top) / 2)) : chunk;
      begin = from_top ? top : std::max(top, bottom - take);
      end = from_top ? std::min(bottom, top + take) : bottom;
      const uint64_t next = from_top ? static_cast<uint64_t>(end) << 32 | static_cast<uint64_t>(bottom)
                                     : static_cast<uint64_t>(top) << 32 | static_cast<uint64_t>(begin);
      if (rows_.compare_exchange_weak(now, next, std::memory_order_relaxed)) return true;
    }
  }

 private:
  std::atomic<uint64_t> rows_{0};
};

// The environment variable that moves the kernels from torch's team to the pool.
inline bool own_pool_requested() { return std::getenv("BNAS_KERNEL_THREADS") != nullptr; }

// True in a child forked from this process. libgomp's threads do not survive fork, and a
// parallel region in the child waits for them forever (torch's own float ops hang there
// too), so a forked child's kernels run on a pool of its own. Set up when the extension loads.
inline std::atomic<bool>& in_forked_child() {
  static std::atomic<bool> forked{false};
  return forked;
}
inline const bool kForkHandlerInstalled =
    (pthread_atfork(nullptr, nullptr, [] { in_forked_child().store(true); }), true);

#ifdef _OPENMP
// f(begin, end) over [0, items) on torch's OpenMP team of `threads`, in chunks. The range is
// cut into one segment per two threads, and a segment is claimed from both ends: thread 2s
// of the team takes segment s's chunks from the top, thread 2s + 1 from the bottom, until
// they meet; then each helps with the other segments. So a thread that the OS pauses holds up
// no fixed share, and a thread gets the same part of every call's range: consecutive kernels
// of a network cut their maps the same way (rows, or channel blocks), so a thread mostly
// reads what it wrote itself in its own core's caches. (Taken from one shared counter, the
// chunks alternated between the threads, and in a Bi-Real ResNet-18 forward on 2 threads a
// binary conv's residual map, 0.4-0.8 MB, crossed between the cores at every layer.) The
// first exception is rethrown after the region (an exception must not leave it); later
// chunks are skipped.
template <class F>
void parallel_for_openmp(int64_t items, int64_t chunk, int threads, F& f, bool guided) {
  const int segments = static_cast<int>(std::min<int64_t>((threads + 1) / 2, items));
  std::vector<TwoEndedRange> ranges(static_cast<size_t>(segments));
  for (int s = 0; s < segments; ++s) ranges[static_cast<size_t>(s)].reset(items * s / segments, items * (s + 1) / segments);
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mu;
#pragma omp parallel num_threads(threads)
  {
    const int id = omp_get_thread_num();
    const bool from_top = id % 2 == 0;
    int64_t begin = 0, end = 0;
    for (int k = 0; k < segments; ++k) {  // its own segment first, then the others
      TwoEndedRange& range = ranges[static_cast<size_t>((id / 2 + k) % segments)];
      while (!failed.load(std::memory_order_relaxed) && range.claim(chunk, from_top, begin, end, guided)) {
        try {
          f(begin, end);
        } catch (...) {
          std::lock_guard<std::mutex> lk(error_mu);
          if (!error) error = std::current_exception();
          failed.store(true, std::memory_order_relaxed);
        }
      }
    }
  }
  if (error) std::rethrow_exception(error);
}
#endif

// parallel_for(items, chunk, threads, f): f(begin, end) over [0, items) in chunks of at most
// `chunk` items, on torch's OpenMP team or (BNAS_KERNEL_THREADS set, inside a parallel region
// already, or in a forked child) on the pool; `guided`: on the team, the last chunks smaller
// (TwoEndedRange::claim).
template <class F>
void parallel_for(int64_t items, int64_t chunk, int threads, F&& f, bool guided = false) {
  if (items <= 0) return;
  if (threads <= 1) {
    f(int64_t{0}, items);
    return;
  }
#ifdef _OPENMP
  if (items >= (int64_t{1} << 31)) {  // the ranges hold 32-bit ends (no kernel comes near)
    f(int64_t{0}, items);
    return;
  }
  if (!own_pool_requested() && !omp_in_parallel() && !in_forked_child().load(std::memory_order_relaxed)) {
    parallel_for_openmp(items, std::max<int64_t>(1, chunk), threads, f, guided);
    return;
  }
#endif
  using Fn = std::remove_reference_t<F>;
  WorkPool::get().run(
      items, chunk, threads,
      [](void* ctx, int64_t begin, int64_t end) { (*static_cast<Fn*>(ctx))(begin, end); },
      const_cast<void*>(static_cast<const void*>(&f)));
}

// Test hooks, bound into the extension module with a leading underscore.
template <class Module>
void bind_work_pool(Module& m) {
  m.def("_work_pool_set_helper_start_delay_us",
        [](int64_t us) { WorkPool::get().set_helper_start_delay_us(us); },
        "test hook: helpers sleep this long after waking before they claim work (0: off)");
  m.def("_work_pool_helpers", [] { return WorkPool::get().helpers(); },
        "helper threads the work pool has started");
  m.def("_work_pool_helper_chunks", [] { return WorkPool::get().helper_chunks(); },
        "chunks of work the helper threads have run");
  m.def(
      "_work_pool_run",
      [](int64_t items, int64_t chunk, int64_t threads, int64_t throw_at) {
        // out[i] = 3 * i + 1 once per item; item `throw_at` throws instead (-1: none).
        std::vector<int64_t> out(static_cast<size_t>(std::max<int64_t>(0, items)), -1);
        parallel_for(items, chunk, static_cast<int>(threads), [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            if (i == throw_at) throw std::runtime_error("work pool test: item " + std::to_string(i));
            out[static_cast<size_t>(i)] = out[static_cast<size_t>(i)] == -1 ? 3 * i + 1 : -2;
          }
        });
        return out;
      },
      "test hook: runs a trivial job on the pool");
  m.def(
      "_work_pool_owners",
      [](int64_t items, int64_t chunk, int64_t threads, int64_t chunk_us) {
        // the OpenMP thread number that ran each item (-1 outside an OpenMP team); each chunk
        // takes chunk_us microseconds, so every thread of the team gets work
        std::vector<int64_t> owner(static_cast<size_t>(std::max<int64_t>(0, items)), -2);
        parallel_for(items, chunk, static_cast<int>(threads), [&](int64_t begin, int64_t end) {
#ifdef _OPENMP
          const int64_t id = omp_in_parallel() ? omp_get_thread_num() : -1;
#else
          const int64_t id = -1;
#endif
          const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(chunk_us);
          while (std::chrono::steady_clock::now() < until) _mm_pause();
          for (int64_t i = begin; i < end; ++i) owner[static_cast<size_t>(i)] = id;
        });
        return owner;
      },
      "test hook: which thread of torch's OpenMP team ran each item of a job");
  m.def(
      "_two_ended_claims",
      [](int64_t items, int64_t chunk, bool guided) {
        // the chunks one thread claims from the top and one from the bottom, taking turns
        TwoEndedRange range;
        range.reset(0, items);
        std::vector<std::pair<int64_t, int64_t>> claims;
        int64_t begin = 0, end = 0;
        for (bool from_top = true; range.claim(chunk, from_top, begin, end, guided); from_top = !from_top)
          claims.emplace_back(begin, end);
        return claims;
      },
      "test hook: the [begin, end) chunks two threads claim from the two ends of a range");
}

}  // namespace bnas
