// The tensor boundary: a torch-free, pybind-free view of a tensor handed over from Python, and the
// checks every native entry point runs on its arguments before touching memory. A failed check throws
// TypeError (wrong dtype) or ValueError (anything else); bindings.cpp turns both into the Python
// exceptions of the same name, so misuse never reaches a kernel.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

namespace furl_fast {

struct TypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

enum class DType { kUInt8, kInt32, kInt64, kBool, kFloat16, kBFloat16, kFloat32, kFloat64, kOther };
enum class DeviceKind { kCPU, kCUDA, kOther };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kUInt8: return "uint8";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kBool: return "bool";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    default: return "an unsupported dtype";
  }
}

inline int dtype_size(DType d) {
  switch (d) {
    case DType::kUInt8: case DType::kBool: return 1;
    case DType::kFloat16: case DType::kBFloat16: return 2;
    case DType::kInt32: case DType::kFloat32: return 4;
    case DType::kInt64: case DType::kFloat64: return 8;
    default: return 1;
  }
}

inline const char* device_name(DeviceKind d) {
  switch (d) {
    case DeviceKind::kCPU: return "cpu";
    case DeviceKind::kCUDA: return "cuda";
    default: return "an unsupported device";
  }
}

struct TensorView {
  static constexpr int kMaxDims = 8;
  // Element count limit (counting empty dimensions as 1), checked when a view is made: every size
  // product, and every byte count of up to 8-byte elements, then fits in int64.
  static constexpr int64_t kMaxElements = int64_t{1} << 60;
  void* data = nullptr;  // already offset by DLPack's byte_offset
  DType dtype = DType::kOther;
  DeviceKind device = DeviceKind::kOther;
  int device_index = 0;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements
  bool read_only = false;

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  bool is_contiguous() const {
    int64_t expected = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expected) return false;
      expected *= shape[i];
    }
    return true;
  }
  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
};

// Fluent checks for one argument of one op:
//   Expect(frames, "preprocess_frames", "frames").ndim(4, "(N, H, W, 3)").dtype({DType::kUInt8})...
class Expect {
 public:
  Expect(const TensorView& t, const char* op, const char* arg) : t_(t), op_(op), arg_(arg) {}

  const Expect& ndim(int n, const char* layout) const {
    if (t_.ndim != n)
      fail<ValueError>("must be a " + std::to_string(n) + "-D tensor " + layout + ", got a " +
                       std::to_string(t_.ndim) + "-D tensor");
    return *this;
  }
  const Expect& dtype(std::initializer_list<DType> allowed) const {
    for (DType d : allowed)
      if (t_.dtype == d) return *this;
    std::string names;
    for (DType d : allowed) names += std::string(names.empty() ? "" : " or ") + dtype_name(d);
    fail<TypeError>("must have dtype " + names + ", got " + dtype_name(t_.dtype));
    return *this;
  }
  const Expect& same_dtype(const TensorView& other, const char* other_name) const {
    if (t_.dtype != other.dtype)
      fail<TypeError>("must have the same dtype as '" + std::string(other_name) + "' (" +
                      dtype_name(other.dtype) + "), got " + dtype_name(t_.dtype));
    return *this;
  }
  const Expect& device(DeviceKind kind) const {
    if (t_.device != kind)
      fail<ValueError>(std::string("must be on the ") + device_name(kind) + " device, got a " +
                       device_name(t_.device) + " tensor");
    return *this;
  }
  const Expect& same_device(const TensorView& other, const char* other_name) const {
    if (t_.device != other.device || t_.device_index != other.device_index)
      fail<ValueError>("must be on the same device as '" + std::string(other_name) + "'");
    return *this;
  }
  const Expect& dim(int i, int64_t size, const char* what) const {
    if (t_.shape[i] != size)
      fail<ValueError>("must have size " + std::to_string(size) + " in dimension " +
                       std::to_string(i) + " (" + what + "), got " + std::to_string(t_.shape[i]));
    return *this;
  }
  const Expect& contiguous() const {
    if (!t_.is_contiguous())
      fail<ValueError>("must be contiguous (call .contiguous() on it first)");
    return *this;
  }
  const Expect& nonempty() const {
    if (t_.numel() == 0) fail<ValueError>("must not be empty (a batch of at least one item)");
    if (t_.data == nullptr) fail<ValueError>("has a null data pointer");
    return *this;
  }
  const Expect& writable() const {
    if (t_.read_only) fail<ValueError>("is read-only but is written to");
    return *this;
  }
  const Expect& aligned() const {
    if (reinterpret_cast<uintptr_t>(t_.data) % dtype_size(t_.dtype) != 0)
      fail<ValueError>("has a data pointer not aligned to its element size");
    return *this;
  }

 private:
  template <typename E>
  [[noreturn]] void fail(const std::string& what) const {
    throw E(std::string(op_) + ": argument '" + arg_ + "' " + what + ".");
  }
  const TensorView& t_;
  const char* op_;
  const char* arg_;
};

}  // namespace furl_fast
