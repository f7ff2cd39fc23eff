// One process-wide pool of helper threads shared by the CPU kernels, and the loops built on it.
// Header-only so the replay core (pure C++17, also built without the Python module) can use it.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <system_error>
#include <thread>

namespace furl_fast {

inline int resolve_threads(int num_threads) {
  if (num_threads > 0) return num_threads;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

// A persistent pool of helper threads for every CPU kernel (reward heads, preprocessing, the replay
// buffer's gathers). Starting threads per call (parallel_for) costs
// tens of microseconds, and on a loaded machine a new thread may not run for milliseconds, which at
// N = 256 (~1 ms of work) made a second thread useless. Here the caller always works (worker 0);
// helpers join only while the job is open, so a helper that wakes late finds the job closed and the
// caller never waits for a thread that has not started. Work is shared through atomic counters inside
// fn, so any split gives the same, bit-identical result.
class HelperPool {
 public:
  // One pool per process, started on first use. A child made by fork() has none of its parent's
  // threads, so it starts its own. Pools are never destroyed: the helpers are detached and sleep, so
  // neither exit nor fork ever joins a thread (joining a parent's thread in a child is undefined).
  static HelperPool& instance() {
    static std::atomic<HelperPool*> current{nullptr};
    HelperPool* pool = current.load(std::memory_order_acquire);
    if (pool != nullptr && pool->pid_ == getpid()) return *pool;
    auto* fresh = new HelperPool(resolve_threads(0) - 1);
    if (current.compare_exchange_strong(pool, fresh, std::memory_order_acq_rel)) return *fresh;
    fresh->stop();  // another thread won the race: retire ours (its helpers exit)
    return *pool;
  }

  // Runs fn(worker) on the calling thread (worker 0) and on up to `helpers` pool threads (workers
  // 1..helpers) that join before the caller is done; returns when every joined worker is done.
  void run(int helpers, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (!busy.owns_lock() || helpers <= 0 || helpers_ == 0) {  // busy: another Python thread
      fn(0);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn;
      max_id_ = helpers;
      next_id_ = 1;
      state_.store(0);
      ++generation_;
    }
    wake_.notify_all();
    std::exception_ptr error;
    try {
      fn(0);
    } catch (...) {
      error = std::current_exception();
    }
    state_.fetch_or(kClosed);  // from here on no helper joins
    while ((state_.load(std::memory_order_acquire) & ~kClosed) != 0) std::this_thread::yield();
    if (!error) error = helper_error_;
    helper_error_ = nullptr;
    if (error) std::rethrow_exception(error);
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
  }

 private:
  static constexpr int64_t kClosed = int64_t{1} << 40;  // state_: closed flag | joined workers

  explicit HelperPool(int helpers) : pid_(getpid()) {
    // Helpers only speed things up: when the process cannot start more threads, run with those
    // that started (an exception here would free the pool under the ones already running).
    for (; helpers_ < helpers; ++helpers_) {
      try {
        std::thread([this] { loop(); }).detach();
      } catch (const std::system_error&) {
        break;
      }
    }
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* fn = nullptr;
      int id = 0;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (next_id_ > max_id_) continue;
        int64_t s = state_.load();
        while (!(s & kClosed) && !state_.compare_exchange_weak(s, s + 1)) {
        }
        if (s & kClosed) continue;
        id = next_id_++;
        fn = fn_;
      }
      try {
        (*fn)(id);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        helper_error_ = std::current_exception();
      }
      state_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::mutex run_mutex_;  // one job at a time
  std::mutex mutex_;
  std::condition_variable wake_;
  const pid_t pid_;
  int helpers_ = 0;  // set before the pool is published, read-only afterwards
  const std::function<void(int)>* fn_ = nullptr;
  int max_id_ = 0, next_id_ = 1;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::atomic<int64_t> state_{0};
  std::exception_ptr helper_error_;
};

// Calls fn(worker, block) for every block in [0, blocks), handed out one at a time to up to
// `threads` workers.
template <typename Fn>
void parallel_blocks(int64_t blocks, int threads, Fn&& fn) {
  std::atomic<int64_t> next{0};
  HelperPool::instance().run(threads - 1, [&](int worker) {
    for (int64_t b = next++; b < blocks; b = next++) fn(worker, b);
  });
}

// Splits [0, n) into contiguous chunks of at least min_chunk and calls fn(begin, end) for each, on
// up to num_threads workers of the pool (0 = all cores); the calling thread always works, so a pool
// without helpers (or busy with another caller) runs everything inline. Exceptions reach the caller.
template <typename F>
void parallel_for(int64_t n, int num_threads, int64_t min_chunk, F&& fn) {
  if (n <= 0) return;
  const int64_t threads = std::clamp<int64_t>((n + min_chunk - 1) / min_chunk, 1,
                                              resolve_threads(num_threads));
  // 4 chunks per worker: one that starts late or is preempted leaves little for the others to wait on.
  const int64_t chunks = std::min<int64_t>(n, threads * 4);
  const int64_t size = (n + chunks - 1) / chunks;
  parallel_blocks((n + size - 1) / size, static_cast<int>(threads), [&](int, int64_t c) {
    fn(c * size, std::min(n, (c + 1) * size));
  });
}

}  // namespace furl_fast
