#include "furl_fast/replay.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "furl_fast/thread_pool.h"

namespace furl_fast {
namespace {

std::string str(int64_t v) { return std::to_string(v); }

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

// A corrupted link can only come from a damaged file that passed the checksum; fail loudly.
[[noreturn]] void corrupted(const char* what) {
  throw std::runtime_error(std::string("replay buffer state is inconsistent (") + what +
                           "); the buffer or the file it was loaded from is corrupted.");
}

}  // namespace

void replay_gather_stack_cpu(const uint8_t* frames, const int64_t* slots, int64_t frame_stack,
                             int64_t channels, int64_t height, int64_t width, int64_t elem_bytes,
                             int64_t pad, int32_t sx, int32_t sy, bool shift, uint8_t* out) {
  const int64_t plane = height * width, frame = channels * plane * elem_bytes;
  if (shift && elem_bytes != 1) throw std::logic_error("the random shift is for uint8 frames only");
  for (int64_t f = 0; f < frame_stack; ++f) {
    const uint8_t* src = frames + slots[f] * frame;
    uint8_t* dst = out + f * frame;
    if (!shift) {
      std::memcpy(dst, src, frame);
      continue;
    }
    // Output pixel (y, x) reads source (clamp(y + sy - pad), clamp(x + sx - pad)): the replicate-
    // padded frame cropped at (sy, sx), without ever building the padded copy. Each row is a
    // memcpy of the in-range run plus the clamped edge pixels on either side.
    const int64_t dx = sx - pad, dy = sy - pad;
    const int64_t left = std::min<int64_t>(width, std::max<int64_t>(0, -dx));
    const int64_t right = std::min<int64_t>(width - left, std::max<int64_t>(0, dx));
    const int64_t mid = width - left - right;
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t y = 0; y < height; ++y) {
        const int64_t ys = std::min<int64_t>(height - 1, std::max<int64_t>(0, y + dy));
        const uint8_t* row = src + c * plane + ys * width;
        uint8_t* o = dst + c * plane + y * width;
        std::memset(o, row[0], left);
        std::memcpy(o + left, row + left + dx, mid);
        std::memset(o + left + mid, row[width - 1], right);
      }
    }
  }
}

void check_random_shift_args(const char* op, const TensorView& frames, const TensorView& slots,
                             const TensorView& shifts, const TensorView& out, int64_t pad,
                             DeviceKind device) {
  Expect(frames, op, "frames").ndim(4, "(capacity, C, H, W)").dtype({DType::kUInt8})
      .device(device).contiguous().nonempty();
  const int64_t channels = frames.shape[1], height = frames.shape[2], width = frames.shape[3];
  Expect(slots, op, "slots").ndim(2, "(B, F)").dtype({DType::kInt64}).same_device(frames, "frames")
      .contiguous().nonempty().aligned();
  const int64_t batch = slots.shape[0], stack = slots.shape[1];
  Expect(shifts, op, "shifts").ndim(2, "(B, 2)").dtype({DType::kInt32})
      .same_device(frames, "frames").dim(0, batch, "batch, as in slots").dim(1, 2, "(x, y)")
      .contiguous().aligned();
  Expect(out, op, "out").ndim(4, "(B, F * C, H, W)").dtype({DType::kUInt8})
      .same_device(frames, "frames").dim(0, batch, "batch").dim(1, stack * channels, "F * C")
      .dim(2, height, "H").dim(3, width, "W").contiguous().writable();
  if (pad < 0 || pad > kMaxShiftPad)
    throw ValueError(std::string(op) + ": argument 'pad' must be in [0, " +
                     std::to_string(kMaxShiftPad) + "], got " + std::to_string(pad) + ".");
}

void random_shift_cpu(const TensorView& frames, const TensorView& slots, const TensorView& shifts,
                      const TensorView& out, int64_t pad, int num_threads) {
  const char* op = "random_shift_cpu";
  check_random_shift_args(op, frames, slots, shifts, out, pad, DeviceKind::kCPU);
  const int64_t capacity = frames.shape[0], batch = slots.shape[0], stack = slots.shape[1];
  const int64_t channels = frames.shape[1], height = frames.shape[2], width = frames.shape[3];
  const int64_t* sl = slots.ptr<int64_t>();
  const int32_t* sh = shifts.ptr<int32_t>();
  for (int64_t i = 0; i < batch * stack; ++i)
    if (sl[i] < 0 || sl[i] >= capacity)
      throw ValueError(std::string(op) + ": argument 'slots' must be in [0, " +
                       std::to_string(capacity) + "), got " + std::to_string(sl[i]) + ".");
  for (int64_t i = 0; i < batch * 2; ++i)
    if (sh[i] < 0 || sh[i] > 2 * pad)
      throw ValueError(std::string(op) + ": argument 'shifts' must be in [0, " +
                       std::to_string(2 * pad) + "], got " + std::to_string(sh[i]) + ".");
  const int64_t sample_bytes = stack * channels * height * width;
  parallel_for(batch, num_threads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      replay_gather_stack_cpu(frames.ptr<uint8_t>(), sl + b * stack, stack, channels, height,
                              width, 1, pad, sh[b * 2], sh[b * 2 + 1], true,
                              out.ptr<uint8_t>() + b * sample_bytes);
  });
}

void check_replay_layout(const ReplayLayout& l) {
  const auto bad = [](const std::string& what) { throw ValueError("ReplayBuffer: " + what + "."); };
  if (l.capacity < 1 || l.capacity > std::numeric_limits<int32_t>::max())
    bad("'capacity' must be in [1, 2^31 - 1], got " + str(l.capacity));
  if (l.num_envs < 1) bad("'num_envs' must be at least 1, got " + str(l.num_envs));
  // Each env's latest observation must survive the writes of the other envs until its next add.
  if (l.capacity <= l.num_envs)
    bad("'capacity' (" + str(l.capacity) + ") must exceed 'num_envs' (" + str(l.num_envs) + ")");
  // A stack or an n-step window never spans more slots than the ring has; the bound also keeps
  // sample()'s per-stack scratch proportional to the storage.
  if (l.frame_stack < 1 || l.frame_stack > l.capacity)
    bad("'frame_stack' must be in [1, capacity = " + str(l.capacity) + "], got " +
        str(l.frame_stack));
  if (l.n_step < 1 || l.n_step > l.capacity)
    bad("'n_step' must be in [1, capacity = " + str(l.capacity) + "], got " + str(l.n_step));
  if (!(l.gamma >= 0.0 && l.gamma <= 1.0)) bad("'gamma' must be in [0, 1]");
  if (l.action_dim < 1) bad("'action_dim' must be at least 1, got " + str(l.action_dim));
  if (l.channels < 1 || l.height < 1 || l.width < 1) bad("'obs_shape' must have positive sizes");
  if (!l.pixels && (l.height != 1 || l.width != 1)) bad("state observations must be 1-D");
  if (l.embedding_dim < 0) bad("'embedding_dim' must be >= 0");
  if (l.embedding_dtype != DType::kFloat32 && l.embedding_dtype != DType::kFloat16)
    bad("'embedding_dtype' must be float32 or float16");
  if (l.shift_pad < 0 || l.shift_pad > kMaxShiftPad)
    bad("'shift_pad' must be in [0, " + std::to_string(kMaxShiftPad) + "]");
  // Slot offsets (slot * frame_bytes() and the like) must not overflow: each column stays below
  // 2^60 bytes, counting 8 bytes per element, as tensors do (TensorView::kMaxElements).
  const auto fits = [&](std::initializer_list<int64_t> sizes) {
    int64_t n = l.capacity * 8;  // capacity < 2^31: no overflow
    for (const int64_t s : sizes)
      if (__builtin_mul_overflow(n, s, &n) || n > TensorView::kMaxElements) return false;
    return true;
  };
  if (!fits({l.channels, l.height, l.width}) || !fits({l.action_dim}) ||
      !fits({std::max<int64_t>(l.embedding_dim, 1)}))
    bad("'capacity' slots of this observation, action and embedding size exceed 2^60 bytes");
}

bool replay_column_stored(const ReplayLayout& l, ReplayColumnShape shape) {
  return shape != ReplayColumnShape::embedding || l.embedding_dim > 0;
}

std::vector<int64_t> replay_column_shape(const ReplayLayout& l, ReplayColumnShape shape) {
  switch (shape) {
    case ReplayColumnShape::slot: return {l.capacity};
    case ReplayColumnShape::action: return {l.capacity, l.action_dim};
    case ReplayColumnShape::obs:
      if (l.pixels) return {l.capacity, l.channels, l.height, l.width};
      return {l.capacity, l.channels};
    case ReplayColumnShape::embedding: return {l.capacity, l.embedding_dim};
    case ReplayColumnShape::state: return {kStateHeader + l.num_envs};
  }
  throw std::logic_error("unknown replay column shape");
}

DType replay_column_dtype(const ReplayLayout& l, ReplayColumnDType dtype) {
  switch (dtype) {
    case ReplayColumnDType::uint8: return DType::kUInt8;
    case ReplayColumnDType::int32: return DType::kInt32;
    case ReplayColumnDType::int64: return DType::kInt64;
    case ReplayColumnDType::float32: return DType::kFloat32;
    case ReplayColumnDType::obs: return l.pixels ? DType::kUInt8 : DType::kFloat32;
    case ReplayColumnDType::embedding: return l.embedding_dtype;
  }
  throw std::logic_error("unknown replay column dtype");
}

DeviceKind replay_column_device(const ReplayLayout& l, ReplayColumnDevice device) {
  return device == ReplayColumnDevice::buffer ? l.device : DeviceKind::kCPU;
}

ReplayCore::ReplayCore(const ReplayLayout& layout, const ReplayColumns& columns,
                       ReplayCopier copier, bool fresh, uint64_t seed)
    : layout_(layout), c_(columns), copy_(copier) {
  const ReplayLayout& l = layout_;
  const auto bad = [](const std::string& what) { throw ValueError("ReplayBuffer: " + what + "."); };
  check_replay_layout(l);
  if (!copy_.fn) bad("no frame copier was given");
#define FURL_REPLAY_CHECK_PRESENT(name, c_type, dtype, shape, device)                    \
  if (!c_.name && replay_column_stored(l, ReplayColumnShape::shape))                     \
    bad("the storage column '" #name "' is missing");
  FURL_REPLAY_COLUMNS(FURL_REPLAY_CHECK_PRESENT)
#undef FURL_REPLAY_CHECK_PRESENT
  if (!fresh) {
    check_state();
    return;
  }
  const int64_t n = l.capacity;
  std::fill(c_.actions, c_.actions + n * l.action_dim, 0.f);
  std::fill(c_.rewards, c_.rewards + n, 0.f);
  std::fill(c_.goal_distances, c_.goal_distances + n, std::numeric_limits<float>::quiet_NaN());
  std::fill(c_.flags, c_.flags + n, uint8_t{0});
  std::fill(c_.prev, c_.prev + n, int64_t{-1});
  std::fill(c_.next, c_.next + n, int64_t{-1});
  std::fill(c_.episodes, c_.episodes + n, int64_t{-1});
  std::fill(c_.steps, c_.steps + n, int32_t{0});
  std::fill(c_.valid_pos, c_.valid_pos + n, int32_t{-1});
  std::fill(c_.valid_list, c_.valid_list + n, int32_t{0});
  std::fill(c_.state, c_.state + kStateHeader + l.num_envs, int64_t{0});
  for (int64_t e = 0; e < l.num_envs; ++e) c_.state[kStateHeader + e] = -1;
  uint64_t s = seed;
  for (int i = 0; i < 4; ++i) {
    const uint64_t r = splitmix64(s);
    std::memcpy(&c_.state[kStateRng + i], &r, 8);
  }
}

void ReplayCore::check_state() const {
  const int64_t cap = layout_.capacity;
  const int64_t* st = c_.state;
  const int64_t written = st[kStateWritten], num_valid = st[kStateNumValid];
  // Adds increment these; a loaded value near int64's limit would overflow (2^62 adds never happen).
  constexpr int64_t kMaxCounter = int64_t{1} << 62;
  if (written < 0 || st[kStateNextEpisode] < 0 || written > kMaxCounter ||
      st[kStateNextEpisode] > kMaxCounter)
    corrupted("counters out of range");
  if (num_valid < 0 || num_valid > std::min(cap, written)) corrupted("valid count out of range");
  uint64_t rng_or = 0;
  for (int i = 0; i < 4; ++i) rng_or |= static_cast<uint64_t>(st[kStateRng + i]);
  if (rng_or == 0) corrupted("all-zero RNG state");
  for (int64_t s = 0; s < cap; ++s) {
    const int32_t p = c_.valid_pos[s];
    if (p < -1 || p >= num_valid || (p >= 0 && c_.valid_list[p] != s)) corrupted("valid positions");
    for (int64_t link : {c_.prev[s], c_.next[s]})
      if (link < -1 || link >= written) corrupted("episode links");
    if (c_.steps[s] < 0) corrupted("negative step");
  }
  for (int64_t i = 0; i < num_valid; ++i) {
    const int32_t s = c_.valid_list[i];
    if (s < 0 || s >= cap || c_.valid_pos[s] != i) corrupted("valid list");
    // Walk the n-step window of each valid transition once, so sample() never follows a bad link.
    int64_t last = s;
    for (int64_t k = 1;; ++k) {
      if (!(c_.flags[last] & kReplayHasNext) || !alive(c_.next[last])) corrupted("n-step window");
      if (k >= layout_.n_step || (c_.flags[last] & (kReplayTerminated | kReplayTruncated))) break;
      last = slot_of(c_.next[last]);
    }
    if (!stack_alive(s)) corrupted("frame stack");
  }
  for (int64_t e = 0; e < layout_.num_envs; ++e) {
    const int64_t seq = st[kStateHeader + e];
    if (seq < -1 || seq >= written) corrupted("open episode of an env");
  }
}

bool ReplayCore::alive(int64_t seq) const {
  const int64_t written = c_.state[kStateWritten];
  return seq >= 0 && seq < written && seq >= written - layout_.capacity;
}

bool ReplayCore::stack_alive(int64_t slot) const {
  int64_t cur = slot;
  for (int64_t h = 1; h < layout_.frame_stack; ++h) {
    const int64_t p = c_.prev[cur];
    if (p < 0) return true;  // episode start: the stack repeats this frame
    if (!alive(p)) return false;
    cur = slot_of(p);
  }
  return true;
}

void ReplayCore::make_valid(int64_t slot) {
  if (c_.valid_pos[slot] >= 0 || !stack_alive(slot)) return;
  int64_t& n = c_.state[kStateNumValid];
  c_.valid_list[n] = static_cast<int32_t>(slot);
  c_.valid_pos[slot] = static_cast<int32_t>(n);
  ++n;
}

void ReplayCore::remove_valid(int64_t slot) {
  const int32_t p = c_.valid_pos[slot];
  if (p < 0) return;
  int64_t& n = c_.state[kStateNumValid];
  const int32_t last = c_.valid_list[n - 1];
  c_.valid_list[p] = last;
  c_.valid_pos[last] = p;
  c_.valid_pos[slot] = -1;
  --n;
}

// Writes the next observation into the oldest slot, first retiring whatever depended on it.
void ReplayCore::write_observation(int64_t env, int64_t prev_seq, int64_t episode, int32_t step,
                                   const void* obs, const void* embedding) {
  const int64_t cap = layout_.capacity;
  int64_t& written = c_.state[kStateWritten];
  const int64_t seq = written, slot = slot_of(seq);
  if (seq >= cap) {
    // The slot's old transition dies, and so do the next frame_stack - 1 transitions of its
    // episode: their stacks reach back to this frame. (Older transitions of that episode are
    // already dead; newer ones never read it.)
    remove_valid(slot);
    int64_t link = c_.next[slot];
    for (int64_t h = 1; h < layout_.frame_stack && link >= 0 && alive(link); ++h) {
      const int64_t s = slot_of(link);
      remove_valid(s);
      link = c_.next[s];
    }
  }
  copy_(c_.frames + slot * layout_.frame_bytes(), obs, layout_.frame_bytes());
  if (layout_.embedding_dim > 0)
    copy_(c_.embeddings + slot * layout_.embedding_bytes(), embedding, layout_.embedding_bytes());
  float* action = c_.actions + slot * layout_.action_dim;
  std::fill(action, action + layout_.action_dim, 0.f);
  c_.rewards[slot] = 0.f;
  c_.goal_distances[slot] = std::numeric_limits<float>::quiet_NaN();
  c_.flags[slot] = 0;
  c_.prev[slot] = prev_seq;
  c_.next[slot] = -1;
  c_.episodes[slot] = episode;
  c_.steps[slot] = step;
  c_.state[kStateHeader + env] = seq;
  ++written;
}

void ReplayCore::check_env(int64_t env, const char* op) const {
  if (env < 0 || env >= layout_.num_envs)
    throw ValueError(std::string(op) + ": 'env' must be in [0, " + str(layout_.num_envs) +
                     "), got " + str(env) + ".");
}

void ReplayCore::start_locked(int64_t env, const void* obs, const void* embedding) {
  const int64_t episode = c_.state[kStateNextEpisode]++;
  write_observation(env, -1, episode, 0, obs, embedding);
}

void ReplayCore::start_episode(int64_t env, const void* obs, const void* embedding) {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  check_env(env, "start_episode");
  if (c_.state[kStateHeader + env] >= 0)
    throw ValueError("start_episode: env " + str(env) +
                     " still has an open episode; end it with add(..., terminated=True or "
                     "truncated=True) first, so that its final observation is stored.");
  start_locked(env, obs, embedding);
}

void ReplayCore::check_add(int64_t env) const {
  check_env(env, "add");
  const int64_t last = c_.state[kStateHeader + env];
  if (last < 0)
    throw ValueError("add: env " + str(env) +
                     " has no open episode; call start_episode(first_obs) after every reset "
                     "(also after a step with terminated or truncated).");
  // The slot about to be written is the oldest one; the env's latest observation must not be it.
  const int64_t written = c_.state[kStateWritten];
  if (!alive(last) || (written >= layout_.capacity && last == written - layout_.capacity))
    throw ValueError("add: env " + str(env) +
                     "'s previous observation was overwritten before its next step was added "
                     "(other envs added " + str(layout_.capacity) +
                     " observations in between); the capacity is too small for this add order.");
  if (c_.steps[slot_of(last)] == std::numeric_limits<int32_t>::max())  // the step counter is full
    throw ValueError("add: env " + str(env) + "'s episode has 2^31 - 1 steps, the most a step "
                     "counter holds; end it with truncate_episode() and start a new one.");
}

void ReplayCore::add_locked(int64_t env, const ReplayStep& st) {
  const int64_t last = c_.state[kStateHeader + env];
  const int64_t s = slot_of(last);
  const int64_t seq = c_.state[kStateWritten];
  std::copy(st.action, st.action + layout_.action_dim, c_.actions + s * layout_.action_dim);
  c_.rewards[s] = st.reward;
  c_.goal_distances[s] = st.goal_distance;
  c_.flags[s] = kReplayHasNext | (st.terminated ? kReplayTerminated : 0) |
                (st.truncated ? kReplayTruncated : 0) | (st.success ? kReplaySuccess : 0);
  c_.next[s] = seq;
  write_observation(env, last, c_.episodes[s], c_.steps[s] + 1, st.obs, st.embedding);
  // n-step windows that this step completes: at an episode end all the open ones (up to n of
  // them), otherwise the one that started n - 1 steps ago.
  const bool done = st.terminated || st.truncated;
  int64_t cur = s;
  for (int64_t k = 0; k < layout_.n_step; ++k) {
    if (done || k == layout_.n_step - 1) make_valid(cur);
    const int64_t p = c_.prev[cur];
    if (p < 0 || !alive(p)) break;
    cur = slot_of(p);
  }
  if (done) c_.state[kStateHeader + env] = -1;
}

void ReplayCore::add(int64_t env, const ReplayStep& step) {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  check_add(env);
  add_locked(env, step);
}

void ReplayCore::add_batch(int64_t n, const ReplayStep* steps, const uint8_t* reset_obs,
                           const uint8_t* reset_embeddings) {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  if (n != layout_.num_envs)
    throw ValueError("add_batch: expected one step per env (" + str(layout_.num_envs) + "), got " +
                     str(n) + ".");
  for (int64_t e = 0; e < n; ++e) check_add(e);
  for (int64_t e = 0; e < n; ++e) {
    check_add(e);  // again: only a too-small capacity can make this fail midway
    add_locked(e, steps[e]);
    if (reset_obs && (steps[e].terminated || steps[e].truncated))
      start_locked(e, reset_obs + e * layout_.frame_bytes(),
                   reset_embeddings ? reset_embeddings + e * layout_.embedding_bytes() : nullptr);
  }
}

int64_t ReplayCore::size() const { return c_.state[kStateNumValid]; }

bool ReplayCore::episode_open(int64_t env) const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  check_env(env, "episode_open");
  return c_.state[kStateHeader + env] >= 0;
}

void ReplayCore::truncate_episode(int64_t env) {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  check_env(env, "truncate_episode");
  const int64_t last = c_.state[kStateHeader + env];
  c_.state[kStateHeader + env] = -1;
  if (last < 0 || !alive(last)) return;
  const int64_t p = c_.prev[slot_of(last)];
  if (p < 0 || !alive(p)) return;
  // Flag the last transition and validate the n-step windows the episode end now closes; the one
  // n - 1 steps back was validated when the last step was added.
  int64_t cur = slot_of(p);
  c_.flags[cur] |= kReplayTruncated;
  for (int64_t k = 0; k + 1 < layout_.n_step; ++k) {
    make_valid(cur);
    const int64_t q = c_.prev[cur];
    if (q < 0 || !alive(q)) break;
    cur = slot_of(q);
  }
}

uint64_t ReplayCore::next_random() {
  // xoshiro256** (Blackman & Vigna): small state that save() can store, fast, good quality.
  uint64_t s[4];
  std::memcpy(s, &c_.state[kStateRng], 32);
  const uint64_t result = rotl(s[1] * 5, 7) * 9;
  const uint64_t t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  std::memcpy(&c_.state[kStateRng], s, 32);
  return result;
}

int64_t ReplayCore::uniform(int64_t n) {
  // Lemire's multiply-shift with rejection: exactly uniform in [0, n).
  const uint64_t un = static_cast<uint64_t>(n);
  unsigned __int128 m = static_cast<unsigned __int128>(next_random()) * un;
  uint64_t low = static_cast<uint64_t>(m);
  if (low < un) {
    const uint64_t threshold = (0 - un) % un;
    while (low < threshold) {
      m = static_cast<unsigned __int128>(next_random()) * un;
      low = static_cast<uint64_t>(m);
    }
  }
  return static_cast<int64_t>(m >> 64);
}

void ReplayCore::check_index(int64_t i, int64_t index, const char* op, const char* arg) const {
  if (index < 0 || index >= layout_.capacity || c_.valid_pos[index] < 0)
    throw ValueError(std::string(op) + ": " + arg + "[" + str(i) + "] = " + str(index) +
                     " is not a sampleable transition (overwritten, an episode's final "
                     "observation, or its n-step window is not complete yet).");
}

void ReplayCore::sample(int64_t batch, bool augment, const int64_t* indices, const int32_t* shifts,
                        const ReplaySampleOut& out, int num_threads) {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  const ReplayLayout& l = layout_;
  const int64_t n = size();
  if (batch < 1)
    throw ValueError("sample: 'batch_size' must be at least 1, got " + str(batch) + ".");
  if (!indices && n == 0)
    throw ValueError("sample: the buffer holds no sampleable transition yet (add more steps).");
  if (!indices && batch > n)
    throw ValueError("sample: 'batch_size' (" + str(batch) + ") is larger than the number of "
                     "sampleable transitions (" + str(n) + ").");
  const int32_t max_shift = static_cast<int32_t>(2 * l.shift_pad);
  const bool shift = l.pixels && (augment || shifts != nullptr);
  std::vector<int64_t> idx(batch);
  std::vector<int32_t> sh(batch * 4, static_cast<int32_t>(l.shift_pad));
  if (indices) {
    for (int64_t b = 0; b < batch; ++b) check_index(b, indices[b], "gather", "indices");
    std::copy(indices, indices + batch, idx.begin());
  }
  if (shifts) {
    for (int64_t i = 0; i < batch * 4; ++i)
      if (shifts[i] < 0 || shifts[i] > max_shift)
        throw ValueError("gather: every shift must be in [0, " + str(max_shift) + "], got " +
                         str(shifts[i]) + ".");
    std::copy(shifts, shifts + batch * 4, sh.begin());
  }
  if (!indices || (shift && !shifts)) {
    // Draws happen in a fixed order (index, then 4 shifts, per sample) on one thread, so a seed
    // gives the same batches whatever num_threads is.
    std::lock_guard<std::mutex> rng_lock(rng_mutex_);
    for (int64_t b = 0; b < batch; ++b) {
      if (!indices) idx[b] = c_.valid_list[uniform(n)];
      if (shift && !shifts)
        for (int j = 0; j < 4; ++j) sh[b * 4 + j] = static_cast<int32_t>(uniform(max_shift + 1));
    }
  }

  const int64_t F = l.frame_stack, fb = l.frame_bytes(), eb = l.embedding_bytes();
  parallel_for(batch, num_threads, 16, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> obs_slots(F), next_slots(F);
    const auto stack_of = [&](int64_t slot, int64_t* chain) {
      chain[F - 1] = slot;
      for (int64_t f = F - 2; f >= 0; --f) {
        const int64_t p = c_.prev[chain[f + 1]];
        chain[f] = p < 0 ? chain[f + 1] : slot_of(p);  // repeat the episode's first frame
      }
    };
    for (int64_t b = begin; b < end; ++b) {
      const int64_t s = idx[b];
      // n-step return: sum gamma^j r_{t+j} until n rewards or the episode's end. Bootstrapping
      // continues through a truncation (discount gamma^k) and stops at termination (discount 0).
      int64_t last = s, k = 1;
      double ret = c_.rewards[s], g = 1.0;
      // Per step j of the window: the observation it returned and gamma^j (for n-step VLM rewards).
      const auto window_step = [&](int64_t j, int64_t slot, double weight) {
        if (out.step_embeddings)
          std::memcpy(out.step_embeddings + (b * l.n_step + j) * eb, c_.embeddings + slot * eb, eb);
        if (out.step_slots) out.step_slots[b * l.n_step + j] = slot;
        if (out.step_discounts) out.step_discounts[b * l.n_step + j] = static_cast<float>(weight);
      };
      while (k < l.n_step && !(c_.flags[last] & (kReplayTerminated | kReplayTruncated))) {
        if (c_.next[last] < 0) corrupted("n-step link");
        window_step(k - 1, slot_of(c_.next[last]), g);
        last = slot_of(c_.next[last]);
        g *= l.gamma;
        ret += g * c_.rewards[last];
        ++k;
      }
      if (c_.next[last] < 0) corrupted("next observation link");
      const int64_t next_slot = slot_of(c_.next[last]);
      window_step(k - 1, next_slot, g);
      for (int64_t j = k; j < l.n_step; ++j) window_step(j, next_slot, 0.0);
      const double discount = (c_.flags[last] & kReplayTerminated) ? 0.0 : g * l.gamma;
      stack_of(s, obs_slots.data());
      stack_of(next_slot, next_slots.data());
      const int32_t* shb = &sh[b * 4];
      const int64_t elem = l.pixels ? 1 : 4;
      if (out.obs)
        replay_gather_stack_cpu(c_.frames, obs_slots.data(), F, l.channels, l.height, l.width, elem,
                                l.shift_pad, shb[0], shb[1], shift, out.obs + b * F * fb);
      if (out.next_obs)
        replay_gather_stack_cpu(c_.frames, next_slots.data(), F, l.channels, l.height, l.width,
                                elem, l.shift_pad, shb[2], shb[3], shift,
                                out.next_obs + b * F * fb);
      if (out.embedding) std::memcpy(out.embedding + b * eb, c_.embeddings + s * eb, eb);
      if (out.next_embedding)
        std::memcpy(out.next_embedding + b * eb, c_.embeddings + next_slot * eb, eb);
      if (out.obs_slots) std::copy(obs_slots.begin(), obs_slots.end(), out.obs_slots + b * F);
      if (out.next_slots) std::copy(next_slots.begin(), next_slots.end(), out.next_slots + b * F);
      if (out.shifts) std::copy(shb, shb + 4, out.shifts + b * 4);
      if (out.action)
        std::copy(c_.actions + s * l.action_dim, c_.actions + (s + 1) * l.action_dim,
                  out.action + b * l.action_dim);
      if (out.reward) out.reward[b] = static_cast<float>(ret);
      if (out.discount) out.discount[b] = static_cast<float>(discount);
      if (out.goal_distance) out.goal_distance[b] = c_.goal_distances[s];
      if (out.success) out.success[b] = (c_.flags[s] & kReplaySuccess) != 0;
      if (out.indices) out.indices[b] = s;
      if (out.episodes) out.episodes[b] = c_.episodes[s];
      if (out.steps) out.steps[b] = c_.steps[s];
    }
  });
}

void ReplayCore::earlier(int64_t n, const int64_t* indices, int64_t k, int64_t* out) const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  if (k < 0) throw ValueError("earlier: 'k' must be >= 0, got " + str(k) + ".");
  for (int64_t i = 0; i < n; ++i) check_index(i, indices[i], "earlier", "indices");
  for (int64_t i = 0; i < n; ++i) {
    int64_t cur = indices[i];
    for (int64_t j = 0; j < k; ++j) {
      const int64_t p = c_.prev[cur];
      if (p < 0 || !alive(p) || c_.valid_pos[slot_of(p)] < 0) break;
      cur = slot_of(p);
    }
    out[i] = cur;
  }
}

}  // namespace furl_fast
