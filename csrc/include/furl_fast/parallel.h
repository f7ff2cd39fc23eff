// Splits [0, n) into contiguous chunks over up to num_threads threads (0 = all cores). The calling
// thread takes the first chunk. Worker exceptions are rethrown on the caller.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <system_error>
#include <thread>
#include <vector>

namespace furl_fast {

inline int resolve_threads(int num_threads) {
  if (num_threads > 0) return num_threads;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

template <typename F>
void parallel_for(int64_t n, int num_threads, int64_t min_chunk, F&& fn) {
  if (n <= 0) return;
  int64_t threads = std::min<int64_t>(resolve_threads(num_threads), (n + min_chunk - 1) / min_chunk);
  threads = std::max<int64_t>(threads, 1);
  const int64_t chunk = (n + threads - 1) / threads;
  std::vector<std::exception_ptr> errors(threads);
  const auto run = [&](int64_t t) {
    const int64_t begin = t * chunk, end = std::min(n, begin + chunk);
    if (begin >= end) return;
    try {
      fn(begin, end);
    } catch (...) {
      errors[t] = std::current_exception();
    }
  };
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  int64_t started = 1;
  try {
    for (; started < threads; ++started) workers.emplace_back(run, started);
  } catch (const std::system_error&) {
    // No thread to be had (the process's thread or memory limit, e.g. num_threads = 1000): the
    // caller runs the chunks that got none. Letting the exception unwind past joinable threads
    // would call std::terminate.
  }
  run(0);
  for (int64_t t = started; t < threads; ++t) run(t);
  for (auto& w : workers) w.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace furl_fast
