// Stand-alone test of the replay core, built without Python or torch (the core must not need them):
//   g++ -std=c++17 -O1 -Icsrc/include csrc/replay/replay.cpp csrc/replay/test/replay_core_test.cpp
// python_tests/test_replay.py builds and runs it. Exit code 0 = pass.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "furl_fast/replay.h"

using namespace furl_fast;

#define CHECK(cond)                                                     \
  do {                                                                  \
    if (!(cond)) {                                                      \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      return 1;                                                         \
    }                                                                   \
  } while (0)

namespace {

void copy_bytes(void* dst, const void* src, int64_t n, void*) { std::memcpy(dst, src, n); }

// Host memory for every column the layout stores, sized by the column rules.
struct Storage {
  explicit Storage(const ReplayLayout& l) {
#define FURL_REPLAY_ALLOCATE(name, c_type, dtype, shape, device)                     \
  if (replay_column_stored(l, ReplayColumnShape::shape)) {                          \
    int64_t bytes = dtype_size(replay_column_dtype(l, ReplayColumnDType::dtype));   \
    for (int64_t n : replay_column_shape(l, ReplayColumnShape::shape)) bytes *= n;  \
    name.resize(bytes / sizeof(c_type));                                            \
  }
    FURL_REPLAY_COLUMNS(FURL_REPLAY_ALLOCATE)
#undef FURL_REPLAY_ALLOCATE
  }
  ReplayColumns columns() {
    ReplayColumns c;
#define FURL_REPLAY_POINT(name, c_type, dtype, shape, device) \
  c.name = name.empty() ? nullptr : name.data();
    FURL_REPLAY_COLUMNS(FURL_REPLAY_POINT)
#undef FURL_REPLAY_POINT
    return c;
  }
#define FURL_REPLAY_VECTOR(name, c_type, dtype, shape, device) std::vector<c_type> name;
  FURL_REPLAY_COLUMNS(FURL_REPLAY_VECTOR)
#undef FURL_REPLAY_VECTOR
};

}  // namespace

int main() {
  // 1 x 1 x 1 pixel frames whose value is (10 * episode + step): stacks show what they read.
  ReplayLayout l;
  l.capacity = 10;
  l.frame_stack = 3;
  l.n_step = 2;
  l.gamma = 0.5;
  l.action_dim = 1;
  l.pixels = true;
  l.channels = l.height = l.width = 1;
  Storage s(l);
  ReplayCopier copier;
  copier.fn = copy_bytes;
  ReplayCore core(l, s.columns(), copier, true, 42);

  const float action = 0.f;
  for (int ep = 0; ep < 4; ++ep) {
    uint8_t v = static_cast<uint8_t>(10 * ep);
    core.start_episode(0, &v, nullptr);
    for (int t = 1; t <= 4; ++t) {
      ReplayStep st;
      v = static_cast<uint8_t>(10 * ep + t);
      st.obs = &v;
      st.action = &action;
      st.reward = 1.f;
      st.truncated = t == 4;
      core.add(0, st);
    }
  }
  // 20 observations written into 10 slots: episode 3 (slots 5..9) and episode 2's last 5 frames
  // (steps 0..4 in slots 0..4, since each episode takes 5 slots). All 8 transitions are complete;
  // none of them needs an overwritten frame.
  CHECK(core.size() == 8);

  const int B = 8;
  std::vector<uint8_t> obs(B * 3), next_obs(B * 3);
  std::vector<float> reward(B), discount(B);
  std::vector<int64_t> idx(B), eps(B), steps(B);
  ReplaySampleOut out;
  out.obs = obs.data();
  out.next_obs = next_obs.data();
  out.reward = reward.data();
  out.discount = discount.data();
  out.indices = idx.data();
  out.episodes = eps.data();
  out.steps = steps.data();
  core.sample(B, false, nullptr, nullptr, out, 2);
  for (int b = 0; b < B; ++b) {
    const int base = 10 * static_cast<int>(eps[b]), t = static_cast<int>(steps[b]);
    CHECK(eps[b] == 2 || eps[b] == 3);
    for (int f = 0; f < 3; ++f) CHECK(obs[b * 3 + f] == base + std::max(0, t - 2 + f));
    const int k = t == 3 ? 1 : 2;  // the window of step 3 ends at the truncation
    for (int f = 0; f < 3; ++f) CHECK(next_obs[b * 3 + f] == base + std::max(0, t + k - 2 + f));
    CHECK(reward[b] == (k == 2 ? 1.5f : 1.f));
    CHECK(discount[b] == (k == 2 ? 0.25f : 0.5f));
  }

  bool threw = false;
  try {
    ReplayStep st;
    uint8_t v = 0;
    st.obs = &v;
    st.action = &action;
    core.add(0, st);  // the last episode was truncated: no open episode
  } catch (const ValueError&) {
    threw = true;
  }
  CHECK(threw);
  std::puts("replay_core_test: ok");
  return 0;
}
