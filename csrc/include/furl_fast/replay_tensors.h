// The tensor boundary of the replay buffer: takes TensorViews (from DLPack), checks every one of them
// (dtype, shape, device, contiguity, writability) and calls ReplayCore with plain pointers.
// bindings.cpp only turns capsules into TensorViews and releases the GIL.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "furl_fast/replay.h"
#include "furl_fast/tensor.h"

namespace furl_fast {

// The storage columns (FURL_REPLAY_COLUMNS); null ones are missing. Every column the layout stores
// is required; one it does not store (embeddings without embedding_dim) is ignored.
struct ReplayColumnViews {
#define FURL_REPLAY_COLUMN_VIEW(name, c_type, dtype, shape, device) \
  const TensorView* name = nullptr;
  FURL_REPLAY_COLUMNS(FURL_REPLAY_COLUMN_VIEW)
#undef FURL_REPLAY_COLUMN_VIEW
};

// Optional outputs of sample(); null ones are not written. See ReplaySampleOut for the shapes.
struct ReplayOutViews {
  const TensorView *obs = nullptr, *next_obs = nullptr, *embedding = nullptr,
                   *next_embedding = nullptr, *step_embeddings = nullptr,
                   *step_slots = nullptr, *step_discounts = nullptr, *obs_slots = nullptr,
                   *next_slots = nullptr,
                   *shifts = nullptr, *action = nullptr, *reward = nullptr, *discount = nullptr,
                   *goal_distance = nullptr, *success = nullptr, *indices = nullptr,
                   *episodes = nullptr, *steps = nullptr;
};

class ReplayTensors {
 public:
  ReplayTensors(const ReplayLayout& layout, const ReplayColumnViews& columns, bool fresh,
                uint64_t seed);

  void start_episode(int64_t env, const TensorView& obs, const TensorView* embedding,
                     uintptr_t stream);
  void add(int64_t env, const TensorView& obs, const TensorView& action, double reward,
           bool terminated, bool truncated, bool success, const TensorView* embedding,
           double goal_distance, uintptr_t stream);
  // obs (N, *obs_shape), actions (N, A) float32, rewards / goal_distances (N,) float32,
  // terminated / truncated / success (N,) bool, embeddings (N, D), reset_obs like obs.
  void add_batch(const TensorView& obs, const TensorView& actions, const TensorView& rewards,
                 const TensorView& terminated, const TensorView& truncated,
                 const TensorView& success, const TensorView* embeddings,
                 const TensorView& goal_distances, const TensorView* reset_obs,
                 const TensorView* reset_embeddings, uintptr_t stream);
  void sample(int64_t batch, bool augment, const TensorView* indices, const TensorView* shifts,
              const ReplayOutViews& out, int num_threads);
  void earlier(const TensorView& indices, int64_t k, const TensorView& out) const;
  int64_t size() const { return core_->size(); }
  bool episode_open(int64_t env) const { return core_->episode_open(env); }
  void truncate_episode(int64_t env) { core_->truncate_episode(env); }

 private:
  // The checked data pointer of one storage column (null when the layout does not store it); its
  // memory may not overlap the columns checked before it.
  void* bind_column(const char* name, const TensorView* view, ReplayColumnDType dtype,
                    ReplayColumnShape shape, ReplayColumnDevice device);
  // expect_tensor() plus: t does not overlap the buffer's own storage.
  void expect_arg(const TensorView& t, const char* op, const char* arg,
                  const std::vector<int64_t>& shape, DType dtype, DeviceKind device,
                  bool writable) const;
  void check_obs(const char* op, const char* arg, const TensorView& obs, int64_t batch) const;
  void check_embedding(const char* op, const char* arg, const TensorView* e, int64_t batch) const;

  ReplayLayout layout_;
  uintptr_t stream_ = 0;  // the caller's CUDA stream for the copy of the current add
  int device_index_ = 0;  // GPU of the frames in GPU mode
  std::unique_ptr<ReplayCore> core_;
  std::vector<std::pair<const char*, std::pair<uintptr_t, uintptr_t>>> storage_;  // column bytes
};

}  // namespace furl_fast
