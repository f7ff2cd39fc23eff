#include "furl_fast/replay_tensors.h"

#include <cstring>
#include <string>
#include <vector>

namespace furl_fast {
namespace {

constexpr const char* kOp = "ReplayBuffer";

// Checks a tensor against an exact shape, dtype and device; contiguous and aligned always.
void expect_tensor(const TensorView& t, const char* op, const char* arg,
                   const std::vector<int64_t>& shape, DType dtype, DeviceKind device,
                   bool writable) {
  std::string layout = "(";
  for (size_t i = 0; i < shape.size(); ++i) layout += (i ? ", " : "") + std::to_string(shape[i]);
  layout += shape.size() == 1 ? ",)" : ")";
  const Expect e(t, op, arg);
  e.ndim(static_cast<int>(shape.size()), layout.c_str()).dtype({dtype}).device(device);
  for (size_t i = 0; i < shape.size(); ++i) e.dim(static_cast<int>(i), shape[i], layout.c_str());
  e.contiguous().nonempty().aligned();
  if (writable) e.writable();
}

// [first, last) bytes of a contiguous tensor.
std::pair<uintptr_t, uintptr_t> byte_range(const TensorView& t) {
  const auto first = reinterpret_cast<uintptr_t>(t.data);
  return {first, first + static_cast<uintptr_t>(t.numel() * dtype_size(t.dtype))};
}

bool overlaps(const TensorView& t, std::pair<uintptr_t, uintptr_t> range) {
  const auto [first, last] = byte_range(t);
  return first < range.second && range.first < last;
}

void memcpy_copier(void* dst, const void* src, int64_t bytes, void*) {
  std::memcpy(dst, src, static_cast<size_t>(bytes));
}

}  // namespace

ReplayTensors::ReplayTensors(const ReplayLayout& layout, const ReplayColumnViews& c, bool fresh,
                             uint64_t seed)
    : layout_(layout) {
  check_replay_layout(layout);  // first: the shapes below are built from it
  ReplayColumns cols;
#define FURL_REPLAY_BIND_COLUMN(name, c_type, dtype, shape, device)                        \
  cols.name = static_cast<c_type*>(bind_column(#name, c.name, ReplayColumnDType::dtype,    \
                                               ReplayColumnShape::shape,                   \
                                               ReplayColumnDevice::device));
  FURL_REPLAY_COLUMNS(FURL_REPLAY_BIND_COLUMN)
#undef FURL_REPLAY_BIND_COLUMN
  const DeviceKind dev = layout.device;
  if (dev == DeviceKind::kCUDA && cols.embeddings &&
      c.embeddings->device_index != c.frames->device_index)
    throw ValueError("ReplayBuffer: 'frames' and 'embeddings' must be on the same GPU.");

  ReplayCopier copier;
  if (dev == DeviceKind::kCPU) {
    copier.fn = memcpy_copier;
  } else {
#ifdef FURL_FAST_WITH_CUDA
    copier.fn = [](void* dst, const void* src, int64_t bytes, void* ctx) {
      const auto* self = static_cast<ReplayTensors*>(ctx);
      replay_copy_to_device_cuda(dst, src, bytes, self->device_index_, self->stream_);
    };
    device_index_ = c.frames->device_index;
    copier.ctx = this;
#else
    throw ValueError("ReplayBuffer: device='cuda' needs furl_fast built with its CUDA kernels.");
#endif
  }
  core_ = std::make_unique<ReplayCore>(layout, cols, copier, fresh, seed);
}

void* ReplayTensors::bind_column(const char* name, const TensorView* view,
                                 ReplayColumnDType dtype, ReplayColumnShape shape,
                                 ReplayColumnDevice device) {
  if (!replay_column_stored(layout_, shape)) return nullptr;
  if (!view)
    throw ValueError(std::string("ReplayBuffer: storage column '") + name + "' is missing.");
  expect_tensor(*view, kOp, name, replay_column_shape(layout_, shape),
                replay_column_dtype(layout_, dtype), replay_column_device(layout_, device), true);
  // Columns that share memory would overwrite each other's links and indices, and those are used
  // as offsets: every column needs its own memory, and no argument of a later call may point into
  // it (a sample output written over 'valid_list' would turn it into out-of-range slots).
  for (const auto& [other, range] : storage_)
    if (overlaps(*view, range))
      throw ValueError(std::string("ReplayBuffer: storage columns '") + other + "' and '" + name +
                       "' share memory; each column needs its own tensor.");
  storage_.emplace_back(name, byte_range(*view));
  return view->data;
}

void ReplayTensors::expect_arg(const TensorView& t, const char* op, const char* arg,
                               const std::vector<int64_t>& shape, DType dtype, DeviceKind device,
                               bool writable) const {
  expect_tensor(t, op, arg, shape, dtype, device, writable);
  for (const auto& [column, range] : storage_)
    if (overlaps(t, range))
      throw ValueError(std::string(op) + ": argument '" + arg + "' points into the buffer's '" +
                       column + "' storage; pass a tensor of its own.");
}

void ReplayTensors::check_obs(const char* op, const char* arg, const TensorView& obs,
                              int64_t batch) const {
  std::vector<int64_t> shape;
  if (batch >= 0) shape.push_back(batch);
  shape.push_back(layout_.channels);
  if (layout_.pixels) shape.insert(shape.end(), {layout_.height, layout_.width});
  // GPU mode takes observations from the host or from the buffer's GPU; CPU mode from the host.
  const DeviceKind dev = layout_.device == DeviceKind::kCUDA && obs.device == DeviceKind::kCUDA
                             ? DeviceKind::kCUDA : DeviceKind::kCPU;
  expect_arg(obs, op, arg, shape, layout_.pixels ? DType::kUInt8 : DType::kFloat32, dev, false);
  if (dev == DeviceKind::kCUDA && obs.device_index != device_index_)
    throw ValueError(std::string(op) + ": argument '" + arg + "' is on another GPU than the buffer.");
}

void ReplayTensors::check_embedding(const char* op, const char* arg, const TensorView* e,
                                    int64_t batch) const {
  if (layout_.embedding_dim == 0) {
    if (e) throw ValueError(std::string(op) + ": argument '" + arg +
                            "' was given but the buffer stores no embeddings (embedding_dim=0).");
    return;
  }
  if (!e)
    throw ValueError(std::string(op) + ": argument '" + arg + "' is required (embedding_dim=" +
                     std::to_string(layout_.embedding_dim) + ").");
  std::vector<int64_t> shape;
  if (batch >= 0) shape.push_back(batch);
  shape.push_back(layout_.embedding_dim);
  const DeviceKind dev = layout_.device == DeviceKind::kCUDA && e->device == DeviceKind::kCUDA
                             ? DeviceKind::kCUDA : DeviceKind::kCPU;
  expect_arg(*e, op, arg, shape, layout_.embedding_dtype, dev, false);
  if (dev == DeviceKind::kCUDA && e->device_index != device_index_)
    throw ValueError(std::string(op) + ": argument '" + arg + "' is on another GPU than the buffer.");
}

void ReplayTensors::start_episode(int64_t env, const TensorView& obs, const TensorView* embedding,
                                  uintptr_t stream) {
  check_obs("start_episode", "obs", obs, -1);
  check_embedding("start_episode", "embedding", embedding, -1);
  stream_ = stream;
  core_->start_episode(env, obs.data, embedding ? embedding->data : nullptr);
}

void ReplayTensors::add(int64_t env, const TensorView& obs, const TensorView& action, double reward,
                        bool terminated, bool truncated, bool success, const TensorView* embedding,
                        double goal_distance, uintptr_t stream) {
  check_obs("add", "next_obs", obs, -1);
  check_embedding("add", "embedding", embedding, -1);
  expect_arg(action, "add", "action", {layout_.action_dim}, DType::kFloat32, DeviceKind::kCPU,
                false);
  ReplayStep st;
  st.obs = obs.data;
  st.embedding = embedding ? embedding->data : nullptr;
  st.action = action.ptr<float>();
  st.reward = static_cast<float>(reward);
  st.terminated = terminated;
  st.truncated = truncated;
  st.success = success;
  st.goal_distance = static_cast<float>(goal_distance);
  stream_ = stream;
  core_->add(env, st);
}

void ReplayTensors::add_batch(const TensorView& obs, const TensorView& actions,
                              const TensorView& rewards, const TensorView& terminated,
                              const TensorView& truncated, const TensorView& success,
                              const TensorView* embeddings, const TensorView& goal_distances,
                              const TensorView* reset_obs, const TensorView* reset_embeddings,
                              uintptr_t stream) {
  const int64_t n = layout_.num_envs;
  const DeviceKind cpu = DeviceKind::kCPU;
  check_obs("add_batch", "next_obs", obs, n);
  check_embedding("add_batch", "embedding", embeddings, n);
  expect_arg(actions, "add_batch", "action", {n, layout_.action_dim}, DType::kFloat32, cpu,
                false);
  expect_arg(rewards, "add_batch", "reward", {n}, DType::kFloat32, cpu, false);
  expect_arg(terminated, "add_batch", "terminated", {n}, DType::kBool, cpu, false);
  expect_arg(truncated, "add_batch", "truncated", {n}, DType::kBool, cpu, false);
  expect_arg(success, "add_batch", "success", {n}, DType::kBool, cpu, false);
  expect_arg(goal_distances, "add_batch", "goal_distance", {n}, DType::kFloat32, cpu, false);
  if (reset_obs) {
    check_obs("add_batch", "reset_obs", *reset_obs, n);
    check_embedding("add_batch", "reset_embedding", reset_embeddings, n);
  } else if (reset_embeddings) {
    throw ValueError("add_batch: 'reset_embedding' was given without 'reset_obs'.");
  }
  std::vector<ReplayStep> steps(n);
  const int64_t fb = layout_.frame_bytes(), eb = layout_.embedding_bytes();
  for (int64_t e = 0; e < n; ++e) {
    ReplayStep& st = steps[e];
    st.obs = obs.ptr<uint8_t>() + e * fb;
    st.embedding = embeddings ? embeddings->ptr<uint8_t>() + e * eb : nullptr;
    st.action = actions.ptr<float>() + e * layout_.action_dim;
    st.reward = rewards.ptr<float>()[e];
    st.terminated = terminated.ptr<bool>()[e];
    st.truncated = truncated.ptr<bool>()[e];
    st.success = success.ptr<bool>()[e];
    st.goal_distance = goal_distances.ptr<float>()[e];
  }
  stream_ = stream;
  core_->add_batch(n, steps.data(), reset_obs ? reset_obs->ptr<uint8_t>() : nullptr,
                   reset_embeddings ? reset_embeddings->ptr<uint8_t>() : nullptr);
}

void ReplayTensors::sample(int64_t batch, bool augment, const TensorView* indices,
                           const TensorView* shifts, const ReplayOutViews& o, int num_threads) {
  if (batch < 1)
    throw ValueError("sample: 'batch_size' must be at least 1, got " + std::to_string(batch) + ".");
  const DeviceKind cpu = DeviceKind::kCPU;
  const int64_t F = layout_.frame_stack;
  if (indices) expect_arg(*indices, "gather", "indices", {batch}, DType::kInt64, cpu, false);
  if (shifts) {
    if (!layout_.pixels) throw ValueError("gather: 'shifts' apply to pixel observations only.");
    expect_arg(*shifts, "gather", "shifts", {batch, 4}, DType::kInt32, cpu, false);
  }
  // Checks an optional output and returns its data pointer (null when absent).
  const auto bind = [&](const TensorView* t, const char* name, std::vector<int64_t> shape,
                        DType dtype) -> void* {
    if (!t) return nullptr;
    expect_arg(*t, "sample", name, shape, dtype, cpu, true);
    return t->data;
  };
  std::vector<int64_t> stack_shape = {batch, F * layout_.channels};
  if (layout_.pixels) stack_shape.insert(stack_shape.end(), {layout_.height, layout_.width});
  const DType obs_dtype = layout_.pixels ? DType::kUInt8 : DType::kFloat32;
  const bool embeddings = o.embedding || o.next_embedding || o.step_embeddings;
  if ((o.obs || o.next_obs || embeddings) && layout_.device != cpu)
    throw ValueError("sample: GPU-mode frames are gathered by random_shift_cuda.");
  if (embeddings && layout_.embedding_dim == 0)
    throw ValueError("sample: the buffer stores no embeddings.");
  const int64_t A = layout_.action_dim, D = layout_.embedding_dim, N = layout_.n_step;
  const DType f32 = DType::kFloat32, i64 = DType::kInt64;
  ReplaySampleOut out;
  out.obs = static_cast<uint8_t*>(bind(o.obs, "obs", stack_shape, obs_dtype));
  out.next_obs = static_cast<uint8_t*>(bind(o.next_obs, "next_obs", stack_shape, obs_dtype));
  out.embedding =
      static_cast<uint8_t*>(bind(o.embedding, "embedding", {batch, D}, layout_.embedding_dtype));
  out.next_embedding = static_cast<uint8_t*>(
      bind(o.next_embedding, "next_embedding", {batch, D}, layout_.embedding_dtype));
  out.step_embeddings = static_cast<uint8_t*>(
      bind(o.step_embeddings, "step_embeddings", {batch, N, D}, layout_.embedding_dtype));
  out.step_slots = static_cast<int64_t*>(bind(o.step_slots, "step_slots", {batch, N}, i64));
  out.step_discounts =
      static_cast<float*>(bind(o.step_discounts, "step_discounts", {batch, N}, f32));
  out.obs_slots = static_cast<int64_t*>(bind(o.obs_slots, "obs_slots", {batch, F}, i64));
  out.next_slots = static_cast<int64_t*>(bind(o.next_slots, "next_slots", {batch, F}, i64));
  out.shifts = static_cast<int32_t*>(bind(o.shifts, "shifts", {batch, 4}, DType::kInt32));
  out.action = static_cast<float*>(bind(o.action, "action", {batch, A}, f32));
  out.reward = static_cast<float*>(bind(o.reward, "reward", {batch}, f32));
  out.discount = static_cast<float*>(bind(o.discount, "discount", {batch}, f32));
  out.goal_distance = static_cast<float*>(bind(o.goal_distance, "goal_distance", {batch}, f32));
  out.success = static_cast<bool*>(bind(o.success, "success", {batch}, DType::kBool));
  out.indices = static_cast<int64_t*>(bind(o.indices, "indices", {batch}, i64));
  out.episodes = static_cast<int64_t*>(bind(o.episodes, "episodes", {batch}, i64));
  out.steps = static_cast<int64_t*>(bind(o.steps, "steps", {batch}, i64));
  core_->sample(batch, augment, indices ? indices->ptr<int64_t>() : nullptr,
                shifts ? shifts->ptr<int32_t>() : nullptr, out, num_threads);
}

void ReplayTensors::earlier(const TensorView& indices, int64_t k, const TensorView& out) const {
  Expect(indices, "earlier", "indices").ndim(1, "(N,)");
  const int64_t n = indices.shape[0];
  // Aligned too: the indices are read as int64.
  expect_arg(indices, "earlier", "indices", {n}, DType::kInt64, DeviceKind::kCPU, false);
  expect_arg(out, "earlier", "out", {n}, DType::kInt64, DeviceKind::kCPU, true);
  core_->earlier(n, indices.ptr<int64_t>(), k, out.ptr<int64_t>());
}

}  // namespace furl_fast
