// The replay buffer core: a FIFO ring of observation slots plus per-slot transition data, with
// frame stacking, n-step returns and DrQ random shift done at sample time. Pure C++17: no Python,
// no torch, no CUDA headers. Facade: furl_fast/replay/; the CUDA gather lives in
// csrc/cuda/replay_sample.cu.
//
// Storage model. Every observation an environment returns is written once, into one slot:
//   start_episode(o_0), add(a_0, r_0, o_1), ..., add(a_{T-1}, r_{T-1}, o_T, done)
// writes o_0 .. o_T into T + 1 slots. The transition (o_t, a_t, r_t, o_{t+1}) lives in the slot of o_t
// and links to the slot of o_{t+1} by its sequence number (the global write count when it was
// written; slot = seq % capacity). Slots of one episode are linked both ways (prev / next), so
// episodes of several environments may interleave in the ring (vector envs). The final observation
// o_T occupies a slot with no transition of its own.
//
// A slot is alive while seq >= written - capacity. A transition is *valid* (sampleable) when
//   (1) its own slot and every frame of its frame stack are alive, and
//   (2) its n-step window is complete: n transitions of the episode from it on are stored, or the
//       episode ended (terminated or truncated) inside the window.
// Valid transitions are kept in a dense list (swap-remove), so sampling is exact-uniform and O(1).
// Overwriting the oldest slot removes its transition and the transitions of the next
// frame_stack - 1 steps of its episode, whose stacks would read it: a stack never reads an
// overwritten frame and never crosses into another episode.
#pragma once

#include <cstdint>
#include <mutex>
#include <shared_mutex>
#include <vector>

#include "furl_fast/tensor.h"

namespace furl_fast {

// Bits of ReplayColumns::flags; they describe the transition stored in the slot.
enum ReplayFlag : uint8_t {
  kReplayTerminated = 1,
  kReplayTruncated = 2,
  kReplaySuccess = 4,
  kReplayHasNext = 8,  // the slot holds a transition (its next observation was written)
};

// Layout of the small int64 `state` column: header, then one entry per environment.
enum ReplayState : int {
  kStateWritten = 0,      // observations written so far (the next sequence number)
  kStateNextEpisode = 1,  // the next episode id
  kStateNumValid = 2,     // length of the valid list
  kStateRng = 3,          // 4 words of xoshiro256** state (3..6)
  kStateHeader = 8,       // per env e: state[kStateHeader + e] = seq of its latest observation, or -1
};

struct ReplayLayout {
  int64_t capacity = 0;       // observation slots
  int64_t num_envs = 1;
  int64_t frame_stack = 1;
  int64_t n_step = 1;
  double gamma = 0.99;
  int64_t action_dim = 0;
  bool pixels = false;        // true: frames are uint8 (C, H, W); false: float32 state vectors (C,)
  int64_t channels = 0, height = 1, width = 1;
  int64_t embedding_dim = 0;  // 0: no embeddings stored
  DType embedding_dtype = DType::kFloat32;
  int64_t shift_pad = 4;      // DrQ random shift: replicate-pad 4, shifts in [0, 2 * pad]
  DeviceKind device = DeviceKind::kCPU;  // where frames and embeddings live

  int64_t frame_bytes() const { return channels * height * width * (pixels ? 1 : 4); }
  int64_t embedding_bytes() const { return embedding_dim * dtype_size(embedding_dtype); }
};

// The storage columns, declared once: ReplayColumns (the core's pointers), the checks of
// ReplayTensors, the bindings' column dict, the stand-alone test's storage and
// furl_fast._C.replay_columns() are all generated from this list, and the Python facade allocates,
// saves and loads exactly the columns it exports. The order is the order of the columns in a saved
// replay file.
//
// X(name, c_type, dtype, shape, device), where the last three are rules of a fixed vocabulary
// (ReplayColumnDType / Shape / Device below; Python reads them by these names):
//   c_type  the element type of the core's pointer (frames and embeddings are raw bytes)
//   dtype   uint8, int32, int64 or float32; obs: uint8 pixel frames or float32 state vectors;
//           embedding: layout.embedding_dtype
//   shape   slot: (capacity,); action: (capacity, action_dim); obs: (capacity, *obs_shape);
//           embedding: (capacity, embedding_dim), stored only when embedding_dim > 0;
//           state: (kStateHeader + num_envs,), the one column that is not per slot
//   device  host (CPU memory) or buffer (layout.device: GPU memory in GPU mode)
//
// Adding a column: its line here (at the end, to keep the other columns where files have them),
// then the core code that gives it a meaning (ReplayCore's c_.<name>, its initial value in the
// constructor) and, only if Python reads it itself, that use in furl_fast/replay/. Nothing else
// lists the columns. A file saved before the column existed no longer matches the layout, so
// load() refuses it unless the file format learns to fill the new column in.
#define FURL_REPLAY_COLUMNS(X)                                                                 \
  X(frames, uint8_t, obs, obs, buffer)          /* one observation per slot */                 \
  X(actions, float, float32, action, host)      /* a_t of the slot's transition */             \
  X(rewards, float, float32, slot, host)                                                       \
  X(goal_distances, float, float32, slot, host) /* NaN when not given */                       \
  X(flags, uint8_t, uint8, slot, host)          /* ReplayFlag bits of the transition */        \
  X(prev, int64_t, int64, slot, host)           /* seq of the previous obs, -1 at the start */ \
  X(next, int64_t, int64, slot, host)           /* seq of the next obs, -1 while none */       \
  X(episodes, int64_t, int64, slot, host)                                                      \
  X(steps, int32_t, int32, slot, host)          /* step in episode of the slot's obs */        \
  X(valid_pos, int32_t, int32, slot, host)      /* index in valid_list, -1: not valid */       \
  X(valid_list, int32_t, int32, slot, host)     /* valid slots (state[kStateNumValid]) */      \
  X(state, int64_t, int64, state, host)         /* ReplayState words */                        \
  X(embeddings, uint8_t, embedding, embedding, buffer)

// The rules of the column list; the enumerators are spelled as the rule names Python receives.
enum class ReplayColumnDType { uint8, int32, int64, float32, obs, embedding };
enum class ReplayColumnShape { slot, action, obs, embedding, state };
enum class ReplayColumnDevice { host, buffer };

// Column pointers. frames / embeddings are on layout.device, everything else is host memory;
// embeddings is null when embedding_dim is 0. The owner (the Python facade) keeps them alive
// while the core exists.
struct ReplayColumns {
#define FURL_REPLAY_COLUMN_POINTER(name, c_type, dtype, shape, device) c_type* name = nullptr;
  FURL_REPLAY_COLUMNS(FURL_REPLAY_COLUMN_POINTER)
#undef FURL_REPLAY_COLUMN_POINTER
};

// What the rules mean for one layout.
bool replay_column_stored(const ReplayLayout& layout, ReplayColumnShape shape);
std::vector<int64_t> replay_column_shape(const ReplayLayout& layout, ReplayColumnShape shape);
DType replay_column_dtype(const ReplayLayout& layout, ReplayColumnDType dtype);
DeviceKind replay_column_device(const ReplayLayout& layout, ReplayColumnDevice device);

// Copies one frame / embedding into device-side storage (memcpy on CPU, cudaMemcpy on CUDA).
struct ReplayCopier {
  void (*fn)(void* dst, const void* src, int64_t bytes, void* ctx) = nullptr;
  void* ctx = nullptr;
  void operator()(void* dst, const void* src, int64_t bytes) const { fn(dst, src, bytes, ctx); }
};

struct ReplayStep {
  const void* obs = nullptr;        // the observation the step returned (frame_bytes)
  const void* embedding = nullptr;  // its embedding (embedding_bytes) or null
  const float* action = nullptr;    // action_dim
  float reward = 0.f;
  bool terminated = false, truncated = false, success = false;
  float goal_distance = 0.f;
};

// What sample() writes; null pointers are skipped. Shapes for batch B and stack F:
// obs / next_obs (B, F * frame) in frame layout; obs_slots / next_slots (B, F) int64 (oldest first);
// shifts (B, 4) int32 = (obs x, obs y, next x, next y); step_embeddings (B, n, embedding) and
// step_slots (B, n) int64: o_{t+1} .. o_{t+k} of the n-step window, the last one repeated when the
// episode ended after k < n steps; step_discounts (B, n) float32: gamma^j for j < k, 0 beyond (the
// weights of a per-step reward of those observations in the n-step sum); the rest (B,) or (B, width).
struct ReplaySampleOut {
  uint8_t* obs = nullptr;
  uint8_t* next_obs = nullptr;
  uint8_t* embedding = nullptr;
  uint8_t* next_embedding = nullptr;
  uint8_t* step_embeddings = nullptr;
  int64_t* step_slots = nullptr;
  float* step_discounts = nullptr;
  int64_t* obs_slots = nullptr;
  int64_t* next_slots = nullptr;
  int32_t* shifts = nullptr;
  float* action = nullptr;
  float* reward = nullptr;
  float* discount = nullptr;
  float* goal_distance = nullptr;
  bool* success = nullptr;
  int64_t* indices = nullptr;
  int64_t* episodes = nullptr;
  int64_t* steps = nullptr;
};

// Throws ValueError naming the first field of the layout that is out of range.
void check_replay_layout(const ReplayLayout& layout);

class ReplayCore {
 public:
  // Checks the layout; fresh = true initialises the columns (seeded RNG), fresh = false checks that
  // the columns hold a consistent state (after loading a file) so that no index can go out of range.
  ReplayCore(const ReplayLayout& layout, const ReplayColumns& columns, ReplayCopier copier,
             bool fresh, uint64_t seed);

  const ReplayLayout& layout() const { return layout_; }

  void start_episode(int64_t env, const void* obs, const void* embedding);
  void add(int64_t env, const ReplayStep& step);
  // Vector envs: add(e, steps[e]) for e in [0, n); an env whose step ended its episode is restarted
  // with reset_obs[e] / reset_embeddings[e] when reset_obs is given. Everything is checked first.
  void add_batch(int64_t n, const ReplayStep* steps, const uint8_t* reset_obs,
                 const uint8_t* reset_embeddings);

  int64_t size() const;  // number of valid transitions
  bool episode_open(int64_t env) const;
  // Ends env's open episode as if its last step had been truncated (bootstrap from the observation
  // it returned); an episode with no step yet keeps its first observation as an orphan slot. For
  // resuming a run whose environments cannot be restored mid-episode. No-op when none is open.
  void truncate_episode(int64_t env);

  // Fills `out` for `batch` transitions. indices: given ones (checked) or null to draw uniformly from
  // the valid transitions; shifts: given (B, 4) in [0, 2 * pad] or null to draw them when augment is
  // set (else no shift). Frames are gathered on the CPU only when out.obs / out.next_obs are set.
  void sample(int64_t batch, bool augment, const int64_t* indices, const int32_t* shifts,
              const ReplaySampleOut& out, int num_threads);

  // For each valid index: the transition k steps earlier in the same episode, clamped to the
  // earliest transition of that episode that is still sampleable.
  void earlier(int64_t n, const int64_t* indices, int64_t k, int64_t* out) const;

 private:
  bool alive(int64_t seq) const;
  int64_t slot_of(int64_t seq) const { return seq % layout_.capacity; }
  bool stack_alive(int64_t slot) const;
  void make_valid(int64_t slot);
  void remove_valid(int64_t slot);
  void write_observation(int64_t env, int64_t prev_seq, int64_t episode, int32_t step,
                         const void* obs, const void* embedding);
  void check_env(int64_t env, const char* op) const;
  void check_add(int64_t env) const;
  void add_locked(int64_t env, const ReplayStep& step);
  void start_locked(int64_t env, const void* obs, const void* embedding);
  void check_index(int64_t i, int64_t index, const char* op, const char* arg) const;
  void check_state() const;
  uint64_t next_random();
  int64_t uniform(int64_t n);

  ReplayLayout layout_;
  ReplayColumns c_;
  ReplayCopier copy_;
  // Adds take it exclusively, samples shared: a gather never sees a slot half rewritten.
  mutable std::shared_mutex mutex_;
  // Draws (RNG, writing indices) are serialised separately so concurrent samples stay well-defined.
  std::mutex rng_mutex_;
};

// The CPU gather with the fused shift: out (F * C, H, W) <- the frames of `slots` (F,), each
// C x H x W elements of elem_bytes, shifted by (sx, sy) with replicate padding `pad` when `shift`
// (uint8 frames only).
void replay_gather_stack_cpu(const uint8_t* frames, const int64_t* slots, int64_t frame_stack,
                             int64_t channels, int64_t height, int64_t width, int64_t elem_bytes,
                             int64_t pad, int32_t sx, int32_t sy, bool shift, uint8_t* out);

// The largest replicate padding of the random shift (the replay layout's shift_pad too).
constexpr int64_t kMaxShiftPad = 1024;

// random_shift: out[b, f * C + c] = frames[slots[b, f], c] shifted by shifts[b] = (x, y) with
// replicate padding `pad` (Equivalent: reference.random_shift). frames (capacity, C, H, W) uint8;
// slots (B, F) int64; shifts (B, 2) int32; out (B, F * C, H, W) uint8, all on the kernel's device.
// The checks are shared by both kernels; `device` is the device every tensor must be on.
void check_random_shift_args(const char* op, const TensorView& frames, const TensorView& slots,
                             const TensorView& shifts, const TensorView& out, int64_t pad,
                             DeviceKind device);
// CPU: slots outside [0, capacity) and shifts outside [0, 2 * pad] are a ValueError.
void random_shift_cpu(const TensorView& frames, const TensorView& slots, const TensorView& shifts,
                      const TensorView& out, int64_t pad, int num_threads);

#ifdef FURL_FAST_WITH_CUDA
// csrc/cuda/replay_sample.cu: the GPU cannot check the slots and shifts without a sync, so slots
// outside [0, capacity) give zeros (never an out-of-bounds read) and coordinates are clamped. Runs
// on `stream`.
void random_shift_cuda(const TensorView& frames, const TensorView& slots, const TensorView& shifts,
                       const TensorView& out, int64_t pad, uintptr_t stream);
// Host or device -> device copy on `stream` of GPU `device`; from host memory it is synchronised so
// the source may be freed at once, from device memory it is stream-ordered (no host wait).
void replay_copy_to_device_cuda(void* dst, const void* src, int64_t bytes, int device,
                                uintptr_t stream);
#endif

}  // namespace furl_fast
