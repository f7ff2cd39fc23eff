// The only file that includes pybind11. Tensors arrive as DLPack capsules
// (torch.utils.dlpack.to_dlpack) and are turned into TensorViews; every op then validates its
// arguments itself, so nothing reaches a kernel unchecked. Work runs with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <climits>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>

#include "furl_fast/cuda_runtime_info.h"
#include "furl_fast/dlpack.h"
#include "furl_fast/preprocess.h"
#include "furl_fast/replay_tensors.h"
#include "furl_fast/rewards.h"
#include "furl_fast/tensor.h"

namespace py = pybind11;
using namespace furl_fast;

namespace {

DType dtype_of(const dlpack::DataType& t) {
  if (t.lanes != 1) return DType::kOther;
  switch (t.code) {
    case dlpack::kDLUInt: return t.bits == 8 ? DType::kUInt8 : DType::kOther;
    case dlpack::kDLInt: return t.bits == 32 ? DType::kInt32 : t.bits == 64 ? DType::kInt64 : DType::kOther;
    case dlpack::kDLBool: return t.bits == 8 ? DType::kBool : DType::kOther;
    case dlpack::kDLBfloat: return t.bits == 16 ? DType::kBFloat16 : DType::kOther;
    case dlpack::kDLFloat:
      return t.bits == 16 ? DType::kFloat16 : t.bits == 32 ? DType::kFloat32
                                              : t.bits == 64 ? DType::kFloat64 : DType::kOther;
    default: return DType::kOther;
  }
}

// Reads (never consumes) a DLPack capsule; the capsule, held by the caller's frame, keeps the
// tensor alive for the whole call.
TensorView tensor_arg(const py::handle& obj, const char* op, const char* name) {
  const auto fail = [&](const std::string& what) -> TypeError {
    return TypeError(std::string(op) + ": argument '" + name + "' " + what + ".");
  };
  PyObject* o = obj.ptr();
  const dlpack::Tensor* t = nullptr;
  bool read_only = false;
  if (PyCapsule_IsValid(o, "dltensor")) {
    t = &static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(o, "dltensor"))->dl_tensor;
  } else if (PyCapsule_IsValid(o, "dltensor_versioned")) {
    auto* m = static_cast<dlpack::ManagedTensorVersioned*>(PyCapsule_GetPointer(o, "dltensor_versioned"));
    if (m->version.major != 1) throw fail("is a DLPack capsule of an unsupported major version");
    t = &m->dl_tensor;
    read_only = (m->flags & dlpack::kFlagReadOnly) != 0;
  } else if (PyCapsule_IsValid(o, "used_dltensor") || PyCapsule_IsValid(o, "used_dltensor_versioned")) {
    throw fail("is a DLPack capsule that was already consumed; export the tensor again");
  } else {
    throw fail("must be a DLPack capsule (torch.utils.dlpack.to_dlpack(tensor)), got " +
               std::string(Py_TYPE(o)->tp_name));
  }
  if (t->ndim < 0 || t->ndim > TensorView::kMaxDims)
    throw fail("has " + std::to_string(t->ndim) + " dimensions; at most " +
               std::to_string(TensorView::kMaxDims) + " are supported");
  TensorView v;
  v.ndim = t->ndim;
  v.dtype = dtype_of(t->dtype);
  v.read_only = read_only;
  v.device_index = t->device.device_id;
  switch (t->device.device_type) {
    case dlpack::kDLCPU: case dlpack::kDLCUDAHost: v.device = DeviceKind::kCPU; break;
    case dlpack::kDLCUDA: v.device = DeviceKind::kCUDA; break;
    default: v.device = DeviceKind::kOther;
  }
  // Sizes get multiplied everywhere after this (numel, contiguity, byte offsets), so a shape whose
  // element count does not fit is refused here, once. Empty dimensions count as 1: torch builds
  // empty views such as (0, 2^40, 2^40) whose other sizes multiply past 2^63.
  int64_t count = 1;
  for (int i = 0; i < v.ndim; ++i) {
    if (t->shape[i] < 0) throw fail("has a negative size");
    if (__builtin_mul_overflow(count, std::max<int64_t>(t->shape[i], 1), &count) ||
        count > TensorView::kMaxElements)
      throw ValueError(std::string(op) + ": argument '" + name +
                       "' has a shape whose sizes multiply to more than 2^60 elements.");
  }
  int64_t expected = 1;
  for (int i = v.ndim - 1; i >= 0; --i) {
    v.shape[i] = t->shape[i];
    v.strides[i] = t->strides ? t->strides[i] : expected;
    expected *= t->shape[i];
  }
  v.data = t->data ? static_cast<char*>(t->data) + t->byte_offset : nullptr;
  return v;
}

PreprocessParams preprocess_params(std::array<int64_t, 4> crop, int64_t size, bool flip, bool bgr,
                                   int interpolation, std::array<float, 3> mean,
                                   std::array<float, 3> std) {
  if (interpolation != 0 && interpolation != 1)
    throw ValueError("preprocess_frames: argument 'interpolation' must be 0 (bilinear) or 1 (bicubic).");
  PreprocessParams p;
  p.crop_top = crop[0];
  p.crop_left = crop[1];
  p.crop_height = crop[2];
  p.crop_width = crop[3];
  p.size = size;
  p.flip_vertical = flip;
  p.bgr = bgr;
  p.interpolation = static_cast<Interpolation>(interpolation);
  for (int c = 0; c < 3; ++c) {
    p.mean[c] = mean[c];
    p.std[c] = std[c];
  }
  return p;
}

// Static facts of the build: nothing here touches the CUDA driver (see cuda_runtime_info).
py::dict build_info() {
  py::dict d;
  d["cpu_threads"] = static_cast<int>(std::thread::hardware_concurrency());
  d["compiler"] = std::string(__VERSION__);
  d["sanitizers"] = std::string(FURL_FAST_SANITIZE);  // "" unless built with FURL_FAST_SANITIZE
#ifdef FURL_FAST_WITH_CUDA
  d["cuda_compiled"] = true;
  d["cuda_architectures"] = std::string(FURL_FAST_CUDA_ARCHS);
  const int runtime = cuda_build_runtime_version();
  d["cuda_runtime_version"] = std::to_string(runtime / 1000) + "." +
                              std::to_string((runtime % 1000) / 10);
#else
  d["cuda_compiled"] = false;
  d["cuda_architectures"] = std::string();
  d["cuda_runtime_version"] = py::none();
#endif
  return d;
}

// The numeric limits the native checks enforce, for the Python checks to use the same numbers.
py::dict limits() {
  py::dict d;
  d["max_preprocess_size"] = kMaxPreprocessSize;
  d["max_shift_pad"] = kMaxShiftPad;
  d["max_threads"] = static_cast<int64_t>(INT32_MAX);  // num_threads is a C int
  d["max_elements"] = TensorView::kMaxElements;
  d["max_dims"] = TensorView::kMaxDims;
  d["replay_state_header"] = static_cast<int64_t>(kStateHeader);  // the replay 'state' column
  return d;
}

// ---- replay buffer (csrc/replay/) -------------------------------------------------------------

std::optional<TensorView> optional_tensor(const py::object& obj, const char* op, const char* name) {
  if (obj.is_none()) return std::nullopt;
  return tensor_arg(obj, op, name);
}

const TensorView* ptr_or_null(const std::optional<TensorView>& t) { return t ? &*t : nullptr; }

// Owns the native buffer and the DLPack capsules of its columns: the columns' memory (torch
// tensors) stays alive for as long as this object does.
struct ReplayHandle {
  std::unique_ptr<ReplayTensors> impl;
  py::list columns;
};

DType replay_embedding_dtype(const std::string& name) {
  if (name == "float32") return DType::kFloat32;
  if (name == "float16") return DType::kFloat16;
  throw TypeError("ReplayBuffer: 'embedding_dtype' must be float32 or float16, got " + name + ".");
}

// One entry of the layout dict; a missing key or a value of the wrong type is a ValueError /
// TypeError naming the entry (not pybind11's KeyError or cast error).
template <typename T>
T layout_entry(const py::dict& layout, const char* key, const char* type) {
  if (!layout.contains(key))
    throw ValueError(std::string("ReplayBuffer: layout entry '") + key + "' is missing.");
  const py::object value = layout[key];
  // No implicit conversions: a float capacity or a string gamma is a mistake, not a number.
  PyObject* v = value.ptr();
  bool ok;
  if constexpr (std::is_same_v<T, bool>) ok = PyBool_Check(v);
  else if constexpr (std::is_same_v<T, double>) ok = PyFloat_Check(v) || PyLong_Check(v);
  else if constexpr (std::is_same_v<T, int64_t>) ok = PyLong_Check(v) && !PyBool_Check(v);
  else ok = PyUnicode_Check(v);
  if (ok) {
    try {
      return value.cast<T>();
    } catch (const py::cast_error&) {  // an int beyond int64
    }
  }
  throw TypeError(std::string("ReplayBuffer: layout entry '") + key + "' must be " + type +
                  ", got " + std::string(py::repr(value)) + ".");
}

std::unique_ptr<ReplayHandle> make_replay(py::dict layout_args, py::dict cols, bool fresh,
                                          uint64_t seed) {
  const auto integer = [&](const char* key) {
    return layout_entry<int64_t>(layout_args, key, "an int in the int64 range");
  };
  ReplayLayout l;
  l.capacity = integer("capacity");
  l.num_envs = integer("num_envs");
  l.frame_stack = integer("frame_stack");
  l.n_step = integer("n_step");
  l.gamma = layout_entry<double>(layout_args, "gamma", "a float");
  l.action_dim = integer("action_dim");
  l.pixels = layout_entry<bool>(layout_args, "pixels", "a bool");
  l.channels = integer("channels");
  l.height = integer("height");
  l.width = integer("width");
  l.embedding_dim = integer("embedding_dim");
  l.embedding_dtype =
      replay_embedding_dtype(layout_entry<std::string>(layout_args, "embedding_dtype", "a str"));
  l.shift_pad = integer("shift_pad");
  const std::string device = layout_entry<std::string>(layout_args, "device", "a str");
  if (device != "cpu" && device != "cuda")
    throw ValueError("ReplayBuffer: 'device' must be cpu or cuda, got " + device + ".");
  l.device = device == "cpu" ? DeviceKind::kCPU : DeviceKind::kCUDA;
  auto handle = std::make_unique<ReplayHandle>();
  // Every column of FURL_REPLAY_COLUMNS by name; ReplayTensors checks which ones are required.
  std::vector<std::pair<const char*, std::optional<TensorView>>> views;
#define FURL_REPLAY_COLUMN_NAME(name, c_type, dtype, shape, device) \
  views.emplace_back(#name, std::nullopt);
  FURL_REPLAY_COLUMNS(FURL_REPLAY_COLUMN_NAME)
#undef FURL_REPLAY_COLUMN_NAME
  for (const auto& item : cols) {
    const std::string key = py::str(item.first);
    const auto it =
        std::find_if(views.begin(), views.end(), [&](const auto& v) { return key == v.first; });
    if (it == views.end()) throw ValueError("ReplayBuffer: unknown storage column '" + key + "'.");
    handle->columns.append(item.second);
    it->second = tensor_arg(item.second, "ReplayBuffer", it->first);
  }
  ReplayColumnViews v;
  size_t i = 0;
#define FURL_REPLAY_COLUMN_VIEW(name, c_type, dtype, shape, device) \
  v.name = ptr_or_null(views[i++].second);
  FURL_REPLAY_COLUMNS(FURL_REPLAY_COLUMN_VIEW)
#undef FURL_REPLAY_COLUMN_VIEW
  py::gil_scoped_release release;  // a fresh buffer initialises, a loaded one checks, O(capacity)
  handle->impl = std::make_unique<ReplayTensors>(l, v, fresh, seed);
  return handle;
}

// The storage columns as (name, dtype, shape, device) rules: see FURL_REPLAY_COLUMNS.
py::list replay_columns() {
  py::list columns;
#define FURL_REPLAY_COLUMN_RULES(name, c_type, dtype, shape, device) \
  columns.append(py::make_tuple(#name, #dtype, #shape, #device));
  FURL_REPLAY_COLUMNS(FURL_REPLAY_COLUMN_RULES)
#undef FURL_REPLAY_COLUMN_RULES
  return columns;
}

}  // namespace

// ---- Kernels with a CPU and a CUDA implementation: preprocess_frames and the reward heads.
// One definition per op registers <op>_cpu, whose last argument is num_threads (0 = all cores), and
// in CUDA builds <op>_cuda, whose last argument is the torch stream. Every tensor is a DLPack
// capsule; outputs are preallocated float32 tensors. ----
namespace {

template <bool kCuda>
void register_kernels(py::module_& m) {
  using Where = std::conditional_t<kCuda, uintptr_t, int>;  // the stream, or num_threads
  const auto where_arg = [] {
    if constexpr (kCuda) return py::arg("stream");
    else return py::arg("num_threads") = 0;
  };
  const auto entry = [](const char* op) { return std::string(op) + (kCuda ? "_cuda" : "_cpu"); };
  // The CPU entry points carry their thread count in the op's parameters.
  const auto on_cpu = [](auto params, Where threads) {
    params.num_threads = static_cast<int>(threads);
    return params;
  };

  m.def(
      entry("preprocess_frames").c_str(),
      [op = entry("preprocess_frames")](py::object frames, py::object out,
                                        std::array<int64_t, 4> crop, int64_t size, bool flip,
                                        bool bgr, int interpolation, std::array<float, 3> mean,
                                        std::array<float, 3> std, Where where) {
        const TensorView f = tensor_arg(frames, op.c_str(), "frames");
        const TensorView o = tensor_arg(out, op.c_str(), "out");
        const PreprocessParams p = preprocess_params(crop, size, flip, bgr, interpolation, mean, std);
        py::gil_scoped_release release;
        if constexpr (kCuda) preprocess_frames_cuda(f, o, p, where);
        else preprocess_frames_cpu(f, o, p, where);
      },
      py::arg("frames"), py::arg("out"), py::arg("crop"), py::arg("size"), py::arg("flip_vertical"),
      py::arg("bgr"), py::arg("interpolation"), py::arg("mean"), py::arg("std"), where_arg());
  m.def(
      entry("mlp_cosine_reward").c_str(),
      [op = entry("mlp_cosine_reward"), on_cpu](py::object emb, py::object w1, py::object b1,
                                                py::object w2, py::object b2, py::object target,
                                                py::object out, Where where) {
        const char* name = op.c_str();
        const TensorView e = tensor_arg(emb, name, "emb"), a1 = tensor_arg(w1, name, "w1"),
                         c1 = tensor_arg(b1, name, "b1"), a2 = tensor_arg(w2, name, "w2"),
                         c2 = tensor_arg(b2, name, "b2"), t = tensor_arg(target, name, "target"),
                         o = tensor_arg(out, name, "out");
        py::gil_scoped_release release;
        if constexpr (kCuda) mlp_cosine_reward_cuda(e, a1, c1, a2, c2, t, o, where);
        else mlp_cosine_reward_cpu(e, a1, c1, a2, c2, t, o, on_cpu(MlpCosineParams{}, where));
      },
      py::arg("emb"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"),
      py::arg("target"), py::arg("out"), where_arg());
  m.def(
      entry("clip_similarity").c_str(),
      [op = entry("clip_similarity"), on_cpu](py::object img, py::object text, py::object out,
                                              bool normalize, Where where) {
        const char* name = op.c_str();
        const TensorView i = tensor_arg(img, name, "img_emb"),
                         t = tensor_arg(text, name, "text_emb"), o = tensor_arg(out, name, "out");
        ClipSimilarityParams p;
        p.normalize = normalize;
        py::gil_scoped_release release;
        if constexpr (kCuda) clip_similarity_cuda(i, t, o, p, where);
        else clip_similarity_cpu(i, t, o, on_cpu(p, where));
      },
      py::arg("img_emb"), py::arg("text_emb"), py::arg("out"), py::arg("normalize"), where_arg());
  m.def(
      entry("goal_baseline_reward").c_str(),
      [op = entry("goal_baseline_reward"), on_cpu](py::object img, py::object goal,
                                                   py::object baseline, py::object out,
                                                   float alpha, Where where) {
        const char* name = op.c_str();
        const TensorView i = tensor_arg(img, name, "img_emb"),
                         g = tensor_arg(goal, name, "goal_emb"),
                         b = tensor_arg(baseline, name, "baseline_emb"),
                         o = tensor_arg(out, name, "out");
        GoalBaselineParams p;
        p.alpha = alpha;
        py::gil_scoped_release release;
        if constexpr (kCuda) goal_baseline_reward_cuda(i, g, b, o, p, where);
        else goal_baseline_reward_cpu(i, g, b, o, on_cpu(p, where));
      },
      py::arg("img_emb"), py::arg("goal_emb"), py::arg("baseline_emb"), py::arg("out"),
      py::arg("alpha"), where_arg());
  m.def(
      entry("softmax_goal_reward").c_str(),
      [op = entry("softmax_goal_reward"), on_cpu](py::object img, py::object text, py::object out,
                                                  int64_t goal_index, float temperature,
                                                  std::optional<float> threshold, Where where) {
        const char* name = op.c_str();
        const TensorView i = tensor_arg(img, name, "img_emb"),
                         t = tensor_arg(text, name, "text_emb"), o = tensor_arg(out, name, "out");
        SoftmaxGoalParams p;
        p.goal_index = goal_index;
        p.temperature = temperature;
        p.has_threshold = threshold.has_value();
        p.threshold = threshold.value_or(0.f);
        py::gil_scoped_release release;
        if constexpr (kCuda) softmax_goal_reward_cuda(i, t, o, p, where);
        else softmax_goal_reward_cpu(i, t, o, on_cpu(p, where));
      },
      py::arg("img_emb"), py::arg("text_emb"), py::arg("out"), py::arg("goal_index"),
      py::arg("temperature"), py::arg("threshold"), where_arg());
}

}  // namespace
// ---- end of CPU + CUDA kernels ----

PYBIND11_MODULE(_C, m) {
  m.doc() = "furl_fast native core (CPU and CUDA kernels, replay buffer)";
  py::register_exception<TypeError>(m, "NativeTypeError", PyExc_TypeError);
  py::register_exception<ValueError>(m, "NativeValueError", PyExc_ValueError);

  m.def("build_info", &build_info, "Build facts of the native module (no CUDA call).");
  m.def("limits", &limits, "The numeric limits of the native argument checks.");
#ifdef FURL_FAST_WITH_CUDA
  // Initialises the CUDA driver: furl_fast calls it lazily, never at import.
  m.def("cuda_runtime_info", [] {
    const CudaRuntimeInfo info = cuda_runtime_info();
    py::dict d;
    d["runtime_version"] = info.runtime_version;
    d["driver_version"] = info.driver_version;
    d["device_count"] = info.device_count;
    d["error_code"] = info.error_code;
    d["error"] = info.error;
    return d;
  });
#endif

  // ---- replay buffer (csrc/replay/; facade furl_fast/replay/) ----------------------------------
  m.def("replay_columns", &replay_columns,
        "The replay buffer's storage columns: (name, dtype, shape, device) rules, in file order.");
  py::class_<ReplayHandle>(m, "ReplayCore")
      .def(py::init(&make_replay), py::arg("layout"), py::arg("columns"), py::arg("fresh"),
           py::arg("seed"))
      .def("__len__", [](const ReplayHandle& h) { return h.impl->size(); })
      .def("episode_open", [](const ReplayHandle& h, int64_t env) { return h.impl->episode_open(env); })
      .def("truncate_episode", [](ReplayHandle& h, int64_t env) { h.impl->truncate_episode(env); })
      .def(
          "start_episode",
          [](ReplayHandle& h, int64_t env, py::object obs, py::object embedding, uintptr_t stream) {
            const TensorView o = tensor_arg(obs, "start_episode", "obs");
            const auto e = optional_tensor(embedding, "start_episode", "embedding");
            py::gil_scoped_release release;
            h.impl->start_episode(env, o, ptr_or_null(e), stream);
          },
          py::arg("env"), py::arg("obs"), py::arg("embedding"), py::arg("stream") = 0)
      .def(
          "add",
          [](ReplayHandle& h, int64_t env, py::object obs, py::object action, double reward,
             bool terminated, bool truncated, bool success, py::object embedding,
             double goal_distance, uintptr_t stream) {
            const TensorView o = tensor_arg(obs, "add", "next_obs");
            const TensorView a = tensor_arg(action, "add", "action");
            const auto e = optional_tensor(embedding, "add", "embedding");
            py::gil_scoped_release release;
            h.impl->add(env, o, a, reward, terminated, truncated, success, ptr_or_null(e),
                        goal_distance, stream);
          },
          py::arg("env"), py::arg("next_obs"), py::arg("action"), py::arg("reward"),
          py::arg("terminated"), py::arg("truncated"), py::arg("success"), py::arg("embedding"),
          py::arg("goal_distance"), py::arg("stream") = 0)
      .def(
          "add_batch",
          [](ReplayHandle& h, py::object obs, py::object actions, py::object rewards,
             py::object terminated, py::object truncated, py::object success,
             py::object embeddings, py::object goal_distances, py::object reset_obs,
             py::object reset_embeddings, uintptr_t stream) {
            const char* op = "add_batch";
            const TensorView o = tensor_arg(obs, op, "next_obs");
            const TensorView a = tensor_arg(actions, op, "action");
            const TensorView r = tensor_arg(rewards, op, "reward");
            const TensorView te = tensor_arg(terminated, op, "terminated");
            const TensorView tr = tensor_arg(truncated, op, "truncated");
            const TensorView su = tensor_arg(success, op, "success");
            const TensorView g = tensor_arg(goal_distances, op, "goal_distance");
            const auto e = optional_tensor(embeddings, op, "embedding");
            const auto ro = optional_tensor(reset_obs, op, "reset_obs");
            const auto re = optional_tensor(reset_embeddings, op, "reset_embedding");
            py::gil_scoped_release release;
            h.impl->add_batch(o, a, r, te, tr, su, ptr_or_null(e), g, ptr_or_null(ro),
                              ptr_or_null(re), stream);
          },
          py::arg("next_obs"), py::arg("action"), py::arg("reward"), py::arg("terminated"),
          py::arg("truncated"), py::arg("success"), py::arg("embedding"), py::arg("goal_distance"),
          py::arg("reset_obs"), py::arg("reset_embedding"), py::arg("stream") = 0)
      .def(
          "sample",
          [](ReplayHandle& h, int64_t batch, bool augment, py::object indices, py::object shifts,
             py::dict outputs, int num_threads) {
            const auto idx = optional_tensor(indices, "gather", "indices");
            const auto sh = optional_tensor(shifts, "gather", "shifts");
            static const char* kNames[] = {"obs", "next_obs", "embedding", "next_embedding",
                                           "step_embeddings", "step_slots", "step_discounts",
                                           "obs_slots", "next_slots", "shifts", "action", "reward",
                                           "discount", "goal_distance", "success", "indices",
                                           "episodes", "steps"};
            std::array<std::optional<TensorView>, 18> views;
            for (const auto& item : outputs) {
              const std::string key = py::str(item.first);
              size_t i = 0;
              while (i < views.size() && key != kNames[i]) ++i;
              if (i == views.size()) throw ValueError("sample: unknown output '" + key + "'.");
              views[i] = optional_tensor(py::reinterpret_borrow<py::object>(item.second), "sample",
                                         kNames[i]);
            }
            ReplayOutViews o;
            const TensorView** slots[] = {&o.obs, &o.next_obs, &o.embedding, &o.next_embedding,
                                          &o.step_embeddings, &o.step_slots, &o.step_discounts,
                                          &o.obs_slots, &o.next_slots, &o.shifts, &o.action,
                                          &o.reward, &o.discount, &o.goal_distance, &o.success,
                                          &o.indices, &o.episodes, &o.steps};
            for (size_t i = 0; i < views.size(); ++i) *slots[i] = ptr_or_null(views[i]);
            py::gil_scoped_release release;
            h.impl->sample(batch, augment, ptr_or_null(idx), ptr_or_null(sh), o, num_threads);
          },
          py::arg("batch_size"), py::arg("augment"), py::arg("indices"), py::arg("shifts"),
          py::arg("outputs"), py::arg("num_threads") = 0)
      .def(
          "earlier",
          [](const ReplayHandle& h, py::object indices, int64_t k, py::object out) {
            const TensorView i = tensor_arg(indices, "earlier", "indices");
            const TensorView o = tensor_arg(out, "earlier", "out");
            py::gil_scoped_release release;
            h.impl->earlier(i, k, o);
          },
          py::arg("indices"), py::arg("k"), py::arg("out"));

  // ---- random_shift: the replay buffer's gather + shift, also public as ops.random_shift ----
  const auto def_random_shift = [&m](const char* name, auto kernel, auto where_arg) {
    m.def(
        name,
        [name, kernel](py::object frames, py::object slots, py::object shifts, py::object out,
                       int64_t pad, decltype(where_arg) where) {
          const TensorView f = tensor_arg(frames, name, "frames");
          const TensorView s = tensor_arg(slots, name, "slots");
          const TensorView sh = tensor_arg(shifts, name, "shifts");
          const TensorView o = tensor_arg(out, name, "out");
          py::gil_scoped_release release;
          kernel(f, s, sh, o, pad, where);
        },
        py::arg("frames"), py::arg("slots"), py::arg("shifts"), py::arg("out"), py::arg("pad"),
        py::arg(std::is_same_v<decltype(where_arg), int> ? "num_threads" : "stream"));
  };
  def_random_shift("random_shift_cpu", &random_shift_cpu, int{0});
#ifdef FURL_FAST_WITH_CUDA
  def_random_shift("random_shift_cuda", &random_shift_cuda, uintptr_t{0});
#endif
  // ---- end replay buffer ----------------------------------------------------------------------

  register_kernels</*kCuda=*/false>(m);
#ifdef FURL_FAST_WITH_CUDA
  register_kernels</*kCuda=*/true>(m);
#endif
}
