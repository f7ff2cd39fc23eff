#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "furl_fast/half.h"
#include "furl_fast/thread_pool.h"
#include "furl_fast/preprocess.h"

namespace furl_fast {

namespace {

// Per output index of one axis: the source indices (already clamped) and normalised weights of its
// taps, padded to a common tap count with zero weights.
struct TapTable {
  int taps = 0;
  std::vector<int64_t> index;
  std::vector<float> weight;
};

TapTable make_taps(const ResampleAxis& ax, int64_t out_size) {
  TapTable t;
  for (int64_t o = 0; o < out_size; ++o) t.taps = std::max(t.taps, window_of(ax, o).count);
  t.index.assign(out_size * t.taps, 0);
  t.weight.assign(out_size * t.taps, 0.f);
  for (int64_t o = 0; o < out_size; ++o) {
    const Window w = window_of(ax, o);
    const float total = window_total(ax, w);
    const float inv = total != 0.f ? 1.f / total : 0.f;
    for (int j = 0; j < w.count; ++j) {
      t.index[o * t.taps + j] = clamp_index(w.first + j, ax.in_size);
      t.weight[o * t.taps + j] = tap_weight(ax, w, j) * inv;
    }
  }
  return t;
}

inline void store(float* p, float v) { *p = v; }
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };
inline void store(Half* p, float v) { p->bits = float_to_half_bits(v); }
inline void store(BFloat16* p, float v) { p->bits = float_to_bfloat16_bits(v); }

// Horizontal pass of one output row, channel by channel so each output plane is written
// sequentially. TAPS > 0 fixes the tap count at compile time (2: bilinear upsampling, 4: bicubic
// upsampling — FuRL's 192 -> 224) so the inner loop unrolls; 0 handles any count.
template <int TAPS, typename OutT>
void horizontal_pass(const float* row, const TapTable& tx, int64_t s, const float* scale,
                     const float* shift, bool bgr, OutT* plane) {
  const int taps = TAPS > 0 ? TAPS : tx.taps;
  const int64_t* index = tx.index.data();
  const float* weight = tx.weight.data();
  for (int c = 0; c < 3; ++c) {
    const float* src = row + (bgr ? 2 - c : c);
    OutT* dst = plane + c * s * s;
    for (int64_t ox = 0; ox < s; ++ox) {
      float acc = 0.f;
      for (int k = 0; k < taps; ++k) acc += weight[ox * taps + k] * src[index[ox * taps + k]];
      store(dst + ox, acc * scale[c] + shift[c]);
    }
  }
}

template <typename OutT>
void run(const TensorView& frames, const TensorView& out, const PreprocessParams& p, int num_threads) {
  const int64_t n = frames.shape[0], h = frames.shape[1], w = frames.shape[2], s = p.size;
  const bool aa = preprocess_antialias(p);
  const bool cubic = p.interpolation == Interpolation::kBicubic;
  const TapTable ty = make_taps(make_axis(p.crop_height, s, aa, cubic), s);
  TapTable tx = make_taps(make_axis(p.crop_width, s, aa, cubic), s);
  for (int64_t& i : tx.index) i *= 3;  // row buffer offsets of interleaved RGB
  float scale[3], shift[3];  // (v / 255 - mean) / std as one multiply-add
  for (int c = 0; c < 3; ++c) {
    scale[c] = 1.f / (255.f * p.std[c]);
    shift[c] = -p.mean[c] / p.std[c];
  }
  const auto horizontal = tx.taps == 2 ? horizontal_pass<2, OutT>
                          : tx.taps == 4 ? horizontal_pass<4, OutT> : horizontal_pass<0, OutT>;
  const uint8_t* src = frames.ptr<uint8_t>();
  OutT* dst = out.ptr<OutT>();
  const int64_t row_len = p.crop_width * 3;

  // One work item = one output row of one frame: blend the source rows it needs vertically into a
  // float row buffer (the only scratch; never a float copy of the frame), then filter horizontally.
  parallel_for(n * s, num_threads, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(row_len);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / s, oy = r % s;
      for (int j = 0; j < ty.taps; ++j) {
        const float wy = ty.weight[oy * ty.taps + j];
        const int64_t yc = p.crop_top + ty.index[oy * ty.taps + j];
        const int64_t y = p.flip_vertical ? h - 1 - yc : yc;
        const uint8_t* line = src + ((b * h + y) * w + p.crop_left) * 3;
        if (j == 0) {
          for (int64_t i = 0; i < row_len; ++i) row[i] = wy * static_cast<float>(line[i]);
        } else if (wy != 0.f) {
          for (int64_t i = 0; i < row_len; ++i) row[i] += wy * static_cast<float>(line[i]);
        }
      }
      horizontal(row.data(), tx, s, scale, shift, p.bgr, dst + (b * 3 * s + oy) * s);
    }
  });
}

}  // namespace

void preprocess_frames_cpu(const TensorView& frames, const TensorView& out, const PreprocessParams& p,
                           int num_threads) {
  check_preprocess_args("preprocess_frames_cpu", frames, out, p, DeviceKind::kCPU);
  switch (out.dtype) {
    case DType::kFloat32: run<float>(frames, out, p, num_threads); break;
    case DType::kFloat16: run<Half>(frames, out, p, num_threads); break;
    default: run<BFloat16>(frames, out, p, num_threads); break;
  }
}

}  // namespace furl_fast
