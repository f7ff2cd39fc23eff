// Splits [0, n) into contiguous chunks over up to num_threads threads (0 = all cores). The calling
// thread takes the first chunk. Worker exceptions are rethrown on the caller.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
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
  std::vector<std::thread> workers;
  std::vector<std::exception_ptr> errors(threads);
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t begin = t * chunk, end = std::min(n, begin + chunk);
    if (begin >= end) break;
    workers.emplace_back([&, t, begin, end] {
      try {
        fn(begin, end);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  }
  try {
    fn(0, std::min(n, chunk));
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& w : workers) w.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace furl_fast
