// CUDA kernels of pixel_unshuffle and pixel_unshuffle_layernorm. One block per output row (the
// backward's blocks stride over rows): a row is r contiguous chunks of r*C elements of x
// (pixel_unshuffle_math.h), so every load and store is a coalesced, 16-byte vector access when C allows.
#include <ATen/Dispatch.h>
#include <cstdint>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/vector.h"
#include "pixel_unshuffle/pixel_unshuffle.h"
#include "pixel_unshuffle/pixel_unshuffle_math.h"

namespace ie {
namespace pixel_unshuffle {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kMaxItems = 16;  // vectors per thread: rows up to kMaxThreads * kMaxItems vectors

// Copies whole chunks as raw `unit_t` words; `g` counts channels in units of unit_t.
template <typename unit_t>
__global__ void permute_kernel(unit_t* __restrict__ x, unit_t* __restrict__ rows, Geometry g, int64_t num_rows, bool to_x) {
  const int64_t row = blockIdx.x;
  if (row >= num_rows) return;
  const int64_t base = row_source_base(row, g), chunk = g.chunk_width();
  for (int64_t q = 0; q < g.factor; ++q) {
    unit_t* x_chunk = x + base + source_offset_in_row(q * chunk, g);
    unit_t* row_chunk = rows + row * g.row_width() + q * chunk;
    for (int64_t m = threadIdx.x; m < chunk; m += blockDim.x) {
      if (to_x) {
        x_chunk[m] = row_chunk[m];
      } else {
        row_chunk[m] = x_chunk[m];
      }
    }
  }
}

template <typename unit_t>
void launch_permute(const at::Tensor& x, const at::Tensor& rows, Geometry g, int64_t element_bytes, bool to_x) {
  g.channels = g.channels * element_bytes / static_cast<int64_t>(sizeof(unit_t));
  const int64_t num_rows = rows.numel() / (rows.size(3));
  TORCH_CHECK(num_rows <= INT32_MAX, "too many output rows for one launch");
  const int threads = warp_threads(g.chunk_width(), 256);
  permute_kernel<unit_t><<<static_cast<unsigned>(num_rows), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<unit_t*>(x.data_ptr()), static_cast<unit_t*>(rows.data_ptr()), g, num_rows, to_x);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Moves the data in the widest word that divides a C-long run of elements and both base pointers.
void permute_cuda(const at::Tensor& x, const at::Tensor& rows, const Geometry& g, bool to_x) {
  if (rows.numel() == 0) return;
  const int64_t element = x.element_size();
  with_word_type(widest_word(g.channels * element, {x.data_ptr(), rows.data_ptr()}), [&](auto tag) {
    launch_permute<decltype(tag)>(x, rows, g, element, to_x);
  });
}

// Sum over the block, the same value in every thread and the same order in every run (deterministic).
// `shared` holds one slot per warp; blockDim.x is a multiple of 32.
template <typename T>
__device__ T block_sum(T value, T* shared) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  __syncthreads();  // the previous call's readers are done with `shared`
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = value;
  __syncthreads();
  T total = 0;
  for (int warp = 0; warp < static_cast<int>(blockDim.x / 32); ++warp) total += shared[warp];
  return total;
}

// Element index of the first of the VEC elements in vector slot `item` of this thread: thread t owns slots
// t + item * blockDim.x of a row, so each of a warp's vector accesses covers 32 consecutive vectors.
template <int VEC>
__device__ __forceinline__ int64_t slot_start(int item) {
  return (threadIdx.x + static_cast<int64_t>(item) * blockDim.x) * VEC;
}

// One block per output row. All ITEMS vector loads of x are issued before the first use: a memory-bound
// kernel is paced by the bytes each SM keeps in flight, and the launch gives every thread several vectors.
// The row stays in registers as raw packs (16-bit inputs take half the registers of their float values),
// and weight and bias are read as vectors of acc_t (L1 hits after the first rows).
template <typename scalar_t, typename acc_t, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxThreads)
    layernorm_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                     scalar_t* __restrict__ out, acc_t* __restrict__ mean_out, acc_t* __restrict__ rstd_out, Geometry g,
                     int64_t num_rows, acc_t eps) {
  __shared__ acc_t shared[kMaxThreads / 32];
  const int64_t row = blockIdx.x;
  if (row >= num_rows) return;
  const int64_t width = g.row_width(), base = row_source_base(row, g);
  Pack<scalar_t, VEC> packs[ITEMS];
  IE_UNROLL
  for (int item = 0; item < ITEMS; ++item) {
    const int64_t k = slot_start<VEC>(item);
    if (k < width) packs[item] = load_pack<scalar_t, VEC>(x + base + source_offset_in_row(k, g));
  }
  acc_t sum = 0;
  IE_UNROLL
  for (int item = 0; item < ITEMS; ++item) {
    if (slot_start<VEC>(item) < width) {
      IE_UNROLL
      for (int e = 0; e < VEC; ++e) sum += static_cast<acc_t>(packs[item].v[e]);
    }
  }
  const acc_t mean = block_sum(sum, shared) / static_cast<acc_t>(width);
  acc_t squares = 0;
  IE_UNROLL
  for (int item = 0; item < ITEMS; ++item) {
    if (slot_start<VEC>(item) < width) {
      IE_UNROLL
      for (int e = 0; e < VEC; ++e) {
        const acc_t centered = static_cast<acc_t>(packs[item].v[e]) - mean;
        squares += centered * centered;
      }
    }
  }
  const acc_t rstd = acc_t(1) / sqrt(block_sum(squares, shared) / static_cast<acc_t>(width) + eps);
  IE_UNROLL
  for (int item = 0; item < ITEMS; ++item) {
    const int64_t k = slot_start<VEC>(item);
    if (k < width) {
      const Pack<acc_t, VEC> w = load_pack<acc_t, VEC>(weight + k), b = load_pack<acc_t, VEC>(bias + k);
      Pack<scalar_t, VEC> result;
      IE_UNROLL
      for (int e = 0; e < VEC; ++e) {
        result.v[e] = static_cast<scalar_t>((static_cast<acc_t>(packs[item].v[e]) - mean) * rstd * w.v[e] + b.v[e]);
      }
      store_pack<scalar_t, VEC>(out + row * width + k, result);
    }
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// Each block strides over rows, keeps its threads' dweight/dbias sums in registers and writes them to its
// row of the [gridDim.x, width] partial buffers. The row of x stays packed in registers between the two
// passes (xhat is recomputed from it: 16-bit inputs take half the registers of a float xhat, which keeps
// the 4-vector launch of 12800-wide rows from spilling), and grad is read twice per row (the second read
// hits cache) to keep register use low.
template <typename scalar_t, typename acc_t, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxThreads)
    layernorm_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                              const acc_t* __restrict__ weight, const acc_t* __restrict__ mean_in,
                              const acc_t* __restrict__ rstd_in, scalar_t* __restrict__ dx, acc_t* __restrict__ partial_dw,
                              acc_t* __restrict__ partial_db, Geometry g, int64_t num_rows) {
  __shared__ acc_t shared[kMaxThreads / 32];
  using pack_t = Pack<scalar_t, VEC>;
  using acc_pack_t = Pack<acc_t, VEC>;
  const int64_t width = g.row_width();
  acc_pack_t dw[ITEMS] = {}, db[ITEMS] = {};
  pack_t x_packs[ITEMS];
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const int64_t base = row_source_base(row, g);
    const acc_t mean = mean_in[row], rstd = rstd_in[row];
    acc_t sum_gw = 0, sum_gw_xhat = 0;
    IE_UNROLL
    for (int item = 0; item < ITEMS; ++item) {
      const int64_t k = slot_start<VEC>(item);
      if (k < width) {
        x_packs[item] = load_pack<scalar_t, VEC>(x + base + source_offset_in_row(k, g));
        const pack_t g_pack = load_pack<scalar_t, VEC>(grad + row * width + k);
        const acc_pack_t w = load_pack<acc_t, VEC>(weight + k);
        IE_UNROLL
        for (int e = 0; e < VEC; ++e) {
          const acc_t gk = static_cast<acc_t>(g_pack.v[e]);
          const acc_t xhat = (static_cast<acc_t>(x_packs[item].v[e]) - mean) * rstd;
          const acc_t gw = gk * w.v[e];
          sum_gw += gw;
          sum_gw_xhat += gw * xhat;
          dw[item].v[e] += gk * xhat;
          db[item].v[e] += gk;
        }
      }
    }
    const acc_t mean_gw = block_sum(sum_gw, shared) / static_cast<acc_t>(width);
    const acc_t mean_gw_xhat = block_sum(sum_gw_xhat, shared) / static_cast<acc_t>(width);
    IE_UNROLL
    for (int item = 0; item < ITEMS; ++item) {
      const int64_t k = slot_start<VEC>(item);
      if (k < width) {
        const pack_t g_pack = load_pack<scalar_t, VEC>(grad + row * width + k);
        const acc_pack_t w = load_pack<acc_t, VEC>(weight + k);
        pack_t dx_pack;
        IE_UNROLL
        for (int e = 0; e < VEC; ++e) {
          const acc_t xhat = (static_cast<acc_t>(x_packs[item].v[e]) - mean) * rstd;
          const acc_t gw = static_cast<acc_t>(g_pack.v[e]) * w.v[e];
          dx_pack.v[e] = static_cast<scalar_t>(rstd * (gw - mean_gw - xhat * mean_gw_xhat));
        }
        store_pack<scalar_t, VEC>(dx + base + source_offset_in_row(k, g), dx_pack);
      }
    }
  }
  IE_UNROLL
  for (int item = 0; item < ITEMS; ++item) {
    const int64_t k = slot_start<VEC>(item);
    if (k < width) {
      store_pack<acc_t, VEC>(partial_dw + blockIdx.x * width + k, dw[item]);
      store_pack<acc_t, VEC>(partial_db + blockIdx.x * width + k, db[item]);
    }
  }
}

// Vectors each forward thread loads before its first reduction (64 bytes in flight per thread), and the
// fewest the backward takes (its registers also hold a float dweight and dbias per element).
constexpr int kForwardItems = 4;
constexpr int kBackwardItems = 1;

// Launch shape of the layernorm kernels: vectors per thread (a power of two, at least `min_items`) and threads
// (a multiple of 32, at most kMaxThreads).
struct RowLaunch {
  int items, threads;
};

RowLaunch row_launch(int64_t width, int vec, int min_items) {
  const int64_t vectors = ceil_div(width, vec);
  int items = min_items;
  while (items < kMaxItems && ceil_div(vectors, items) > kMaxThreads) items *= 2;
  TORCH_CHECK(ceil_div(vectors, items) <= kMaxThreads, "pixel_unshuffle_layernorm: rows of ", width,
              " elements are too wide for one block (at most ", int64_t{kMaxThreads} * kMaxItems * vec, ")");
  return {items, warp_threads(ceil_div(vectors, items), kMaxThreads)};
}

// Calls body(std::integral_constant<int, ITEMS>) for the runtime `items` (a power of two >= MIN_ITEMS):
// only the counts a launch can ask for are compiled.
template <int MIN_ITEMS, typename Body>
void dispatch_items(int items, const Body& body) {
  if constexpr (MIN_ITEMS < kMaxItems) {
    if (items > MIN_ITEMS) return dispatch_items<2 * MIN_ITEMS>(items, body);
  }
  return body(std::integral_constant<int, MIN_ITEMS>{});
}

// weight or bias in the accumulation type, aligned for the kernels' acc_t vectors of VEC elements (a
// parameter that is already acc_t may be a view at any offset; a fresh copy is aligned).
at::Tensor acc_param(const at::Tensor& param, at::ScalarType acc_type, int64_t vector_bytes) {
  at::Tensor converted = param.to(acc_type).contiguous();
  return aligned_to(converted.data_ptr(), vector_bytes) ? converted : converted.clone();
}

}  // namespace

at::Tensor pixel_unshuffle_cuda(const at::Tensor& x, int64_t factor) {
  const Geometry g = input_geometry(x, factor);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0), g.out_h(), g.out_w(), g.row_width()}, x.options());
  permute_cuda(x, out, g, /*to_x=*/false);
  return out;
}

at::Tensor pixel_unshuffle_backward_cuda(const at::Tensor& grad, int64_t factor) {
  const Geometry g = grad_geometry(grad, factor);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor dx = at::empty({grad.size(0), g.h, g.w, g.channels}, grad.options());
  permute_cuda(dx, grad, g, /*to_x=*/true);
  return dx;
}

// The byte alignment the kernels' acc_t vectors of weight and bias need (VEC of them, VEC elements of x per
// 16 bytes), or one element's when x moves element by element.
int64_t param_vector_bytes(bool vectorised, const at::Tensor& x, at::ScalarType acc_type) {
  const int64_t acc_bytes = static_cast<int64_t>(c10::elementSize(acc_type));
  return vectorised ? acc_bytes * (16 / x.element_size()) : acc_bytes;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                              const at::Tensor& bias, double eps, int64_t factor) {
  const LayerNormForward forward = prepare_layernorm(x, weight, bias, factor);
  const Geometry g = forward.g;
  const int64_t width = g.row_width(), num_rows = forward.num_rows;
  const at::Tensor out = forward.out, mean = forward.mean, rstd = forward.rstd;
  if (num_rows == 0 || width == 0) return {out, mean, rstd};
  TORCH_CHECK(num_rows <= INT32_MAX, "too many output rows for one launch");
  const c10::cuda::CUDAGuard guard(x.device());
  const bool vectorised = vectors_fit(x.element_size(), {g.channels}, {x.data_ptr(), out.data_ptr()});
  const int64_t param_bytes = param_vector_bytes(vectorised, x, forward.acc_type);
  const at::Tensor w_acc = acc_param(weight, forward.acc_type, param_bytes);
  const at::Tensor b_acc = acc_param(bias, forward.acc_type, param_bytes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_unshuffle_layernorm_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    dispatch_vec<scalar_t>(vectorised, [&](auto vec) {
      const RowLaunch launch = row_launch(width, decltype(vec)::value, kForwardItems);
      dispatch_items<kForwardItems>(launch.items, [&](auto items) {
        layernorm_kernel<scalar_t, acc_t, decltype(vec)::value, decltype(items)::value>
            <<<static_cast<unsigned>(num_rows), launch.threads, 0, at::cuda::getCurrentCUDAStream()>>>(
                x.data_ptr<scalar_t>(), w_acc.data_ptr<acc_t>(), b_acc.data_ptr<acc_t>(), out.data_ptr<scalar_t>(),
                mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), g, num_rows, static_cast<acc_t>(eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                       const at::Tensor& weight, const at::Tensor& mean,
                                                                       const at::Tensor& rstd, int64_t factor) {
  const Geometry g = check_layernorm_backward_args(grad, x, weight, mean, rstd, factor);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t width = g.row_width(), num_rows = x.size(0) * g.out_h() * g.out_w();
  const at::ScalarType acc_type = stats_type(x);
  at::Tensor dx = at::empty_like(x);
  if (num_rows == 0 || width == 0) {
    const at::Tensor zeros = at::zeros({width}, weight.options());
    return {dx, zeros, zeros.clone()};
  }
  const bool vectorised = vectors_fit(x.element_size(), {g.channels}, {x.data_ptr(), grad.data_ptr(), dx.data_ptr()});
  const at::Tensor w_acc = acc_param(weight, acc_type, param_vector_bytes(vectorised, x, acc_type));
  at::Tensor partial_dw, partial_db;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_unshuffle_layernorm_backward_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    dispatch_vec<scalar_t>(vectorised, [&](auto vec) {
      const RowLaunch launch = row_launch(width, decltype(vec)::value, kBackwardItems);
      dispatch_items<kBackwardItems>(launch.items, [&](auto items) {
        auto* kernel = layernorm_backward_kernel<scalar_t, acc_t, decltype(vec)::value, decltype(items)::value>;
        // As many blocks as fit on the GPU at once (each strides over rows): few partial rows to sum.
        int blocks_per_sm = 0;
        C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, launch.threads, 0));
        const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
        const int64_t blocks = std::min<int64_t>(num_rows, sms * std::max(1, blocks_per_sm));
        // at::empty is aligned for the kernel's acc_t vectors, and every row of width elements (a multiple of
        // VEC) keeps the next row aligned.
        partial_dw = at::empty({blocks, width}, x.options().dtype(acc_type));
        partial_db = at::empty({blocks, width}, x.options().dtype(acc_type));
        kernel<<<static_cast<unsigned>(blocks), launch.threads, 0, at::cuda::getCurrentCUDAStream()>>>(
            grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w_acc.data_ptr<acc_t>(), mean.data_ptr<acc_t>(),
            rstd.data_ptr<acc_t>(), dx.data_ptr<scalar_t>(), partial_dw.data_ptr<acc_t>(), partial_db.data_ptr<acc_t>(), g,
            num_rows);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {dx, partial_dw.sum(0).to(weight.scalar_type()), partial_db.sum(0).to(weight.scalar_type())};
}

}  // namespace pixel_unshuffle
}  // namespace ie

TORCH_LIBRARY_IMPL(internvl3_engine_C, CUDA, m) {
  m.impl("pixel_unshuffle", &ie::pixel_unshuffle::pixel_unshuffle_cuda);
  m.impl("pixel_unshuffle_backward", &ie::pixel_unshuffle::pixel_unshuffle_backward_cuda);
  m.impl("pixel_unshuffle_layernorm", &ie::pixel_unshuffle::layernorm_cuda);
  m.impl("pixel_unshuffle_layernorm_backward", &ie::pixel_unshuffle::layernorm_backward_cuda);
}
