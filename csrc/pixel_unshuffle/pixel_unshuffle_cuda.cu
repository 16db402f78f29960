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
  const int threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, ceil_div(g.chunk_width(), 32) * 32)));
  permute_kernel<unit_t><<<static_cast<unsigned>(num_rows), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<unit_t*>(x.data_ptr()), static_cast<unit_t*>(rows.data_ptr()), g, num_rows, to_x);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The widest word (16, 8, 4, 2 or 1 bytes) that divides a C-long run of elements and both base pointers.
void permute_cuda(const at::Tensor& x, const at::Tensor& rows, const Geometry& g, bool to_x) {
  if (rows.numel() == 0) return;
  const int64_t element = x.element_size(), run = g.channels * element;
  auto fits = [&](int64_t bytes) { return run % bytes == 0 && aligned_to(x.data_ptr(), bytes) && aligned_to(rows.data_ptr(), bytes); };
  if (fits(16)) {
    launch_permute<uint4>(x, rows, g, element, to_x);
  } else if (fits(8)) {
    launch_permute<uint2>(x, rows, g, element, to_x);
  } else if (fits(4)) {
    launch_permute<uint32_t>(x, rows, g, element, to_x);
  } else if (fits(2)) {
    launch_permute<uint16_t>(x, rows, g, element, to_x);
  } else {
    launch_permute<uint8_t>(x, rows, g, element, to_x);
  }
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

// Thread t owns vector slots t + item * blockDim.x of every row; slot s holds row elements [s*VEC, s*VEC + VEC).
template <typename scalar_t, typename acc_t, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxThreads)
    layernorm_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                     scalar_t* __restrict__ out, acc_t* __restrict__ mean_out, acc_t* __restrict__ rstd_out, Geometry g,
                     int64_t num_rows, acc_t eps) {
  __shared__ acc_t shared[kMaxThreads / 32];
  const int64_t row = blockIdx.x;
  if (row >= num_rows) return;
  const int64_t width = g.row_width(), base = row_source_base(row, g);
  acc_t values[ITEMS][VEC];
  acc_t sum = 0;
#pragma unroll
  for (int item = 0; item < ITEMS; ++item) {
    const int64_t k = (threadIdx.x + static_cast<int64_t>(item) * blockDim.x) * VEC;
    if (k < width) {
      const Pack<scalar_t, VEC> pack = *reinterpret_cast<const Pack<scalar_t, VEC>*>(x + base + source_offset_in_row(k, g));
#pragma unroll
      for (int e = 0; e < VEC; ++e) values[item][e] = static_cast<acc_t>(pack.v[e]);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) values[item][e] = 0;
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) sum += values[item][e];
  }
  const acc_t mean = block_sum(sum, shared) / static_cast<acc_t>(width);
  acc_t squares = 0;
#pragma unroll
  for (int item = 0; item < ITEMS; ++item) {
    const int64_t k = (threadIdx.x + static_cast<int64_t>(item) * blockDim.x) * VEC;
    if (k < width) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) squares += (values[item][e] - mean) * (values[item][e] - mean);
    }
  }
  const acc_t rstd = acc_t(1) / sqrt(block_sum(squares, shared) / static_cast<acc_t>(width) + eps);
#pragma unroll
  for (int item = 0; item < ITEMS; ++item) {
    const int64_t k = (threadIdx.x + static_cast<int64_t>(item) * blockDim.x) * VEC;
    if (k < width) {
      Pack<scalar_t, VEC> pack;
#pragma unroll
      for (int e = 0; e < VEC; ++e) pack.v[e] = static_cast<scalar_t>((values[item][e] - mean) * rstd * weight[k + e] + bias[k + e]);
      *reinterpret_cast<Pack<scalar_t, VEC>*>(out + row * width + k) = pack;
    }
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// Each block strides over rows, keeps its threads' dweight/dbias sums in registers and writes them to its
// row of the [gridDim.x, width] partial buffers. grad is read twice per row (the second read hits cache)
// to keep register use low.
template <typename scalar_t, typename acc_t, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxThreads)
    layernorm_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                              const acc_t* __restrict__ weight, const acc_t* __restrict__ mean_in,
                              const acc_t* __restrict__ rstd_in, scalar_t* __restrict__ dx, acc_t* __restrict__ partial_dw,
                              acc_t* __restrict__ partial_db, Geometry g, int64_t num_rows) {
  __shared__ acc_t shared[kMaxThreads / 32];
  using pack_t = Pack<scalar_t, VEC>;
  const int64_t width = g.row_width();
  acc_t dw[ITEMS][VEC] = {}, db[ITEMS][VEC] = {}, xhat[ITEMS][VEC];
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const int64_t base = row_source_base(row, g);
    const acc_t mean = mean_in[row], rstd = rstd_in[row];
    acc_t sum_gw = 0, sum_gw_xhat = 0;
#pragma unroll
    for (int item = 0; item < ITEMS; ++item) {
      const int64_t k = (threadIdx.x + static_cast<int64_t>(item) * blockDim.x) * VEC;
      if (k < width) {
        const pack_t x_pack = *reinterpret_cast<const pack_t*>(x + base + source_offset_in_row(k, g));
        const pack_t g_pack = *reinterpret_cast<const pack_t*>(grad + row * width + k);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const acc_t gk = static_cast<acc_t>(g_pack.v[e]);
          xhat[item][e] = (static_cast<acc_t>(x_pack.v[e]) - mean) * rstd;
          const acc_t gw = gk * weight[k + e];
          sum_gw += gw;
          sum_gw_xhat += gw * xhat[item][e];
          dw[item][e] += gk * xhat[item][e];
          db[item][e] += gk;
        }
      }
    }
    const acc_t mean_gw = block_sum(sum_gw, shared) / static_cast<acc_t>(width);
    const acc_t mean_gw_xhat = block_sum(sum_gw_xhat, shared) / static_cast<acc_t>(width);
#pragma unroll
    for (int item = 0; item < ITEMS; ++item) {
      const int64_t k = (threadIdx.x + static_cast<int64_t>(item) * blockDim.x) * VEC;
      if (k < width) {
        const pack_t g_pack = *reinterpret_cast<const pack_t*>(grad + row * width + k);
        pack_t dx_pack;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const acc_t gw = static_cast<acc_t>(g_pack.v[e]) * weight[k + e];
          dx_pack.v[e] = static_cast<scalar_t>(rstd * (gw - mean_gw - xhat[item][e] * mean_gw_xhat));
        }
        *reinterpret_cast<pack_t*>(dx + base + source_offset_in_row(k, g)) = dx_pack;
      }
    }
  }
#pragma unroll
  for (int item = 0; item < ITEMS; ++item) {
    const int64_t k = (threadIdx.x + static_cast<int64_t>(item) * blockDim.x) * VEC;
    if (k < width) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        partial_dw[blockIdx.x * width + k + e] = dw[item][e];
        partial_db[blockIdx.x * width + k + e] = db[item][e];
      }
    }
  }
}

// Launch shape of the layernorm kernels: vectors per thread (a power of two) and threads (a multiple of 32).
struct RowLaunch {
  int items, threads;
};

RowLaunch row_launch(int64_t width, int vec) {
  const int64_t vectors = ceil_div(width, vec);
  int items = 1;
  while (items < kMaxItems && ceil_div(vectors, items) > kMaxThreads) items *= 2;
  TORCH_CHECK(ceil_div(vectors, items) <= kMaxThreads, "pixel_unshuffle_layernorm: rows of ", width,
              " elements are too wide for one block (at most ", int64_t{kMaxThreads} * kMaxItems * vec, ")");
  return {items, static_cast<int>(ceil_div(ceil_div(vectors, items), 32) * 32)};
}

// Calls body(std::integral_constant<int, ITEMS>) for the runtime `items`.
template <typename Body>
void dispatch_items(int items, const Body& body) {
  switch (items) {
    case 1: return body(std::integral_constant<int, 1>{});
    case 2: return body(std::integral_constant<int, 2>{});
    case 4: return body(std::integral_constant<int, 4>{});
    case 8: return body(std::integral_constant<int, 8>{});
    default: return body(std::integral_constant<int, 16>{});
  }
}

bool can_vectorise(const Geometry& g, std::initializer_list<const at::Tensor*> tensors) {
  const int64_t vec = 16 / (*tensors.begin())->element_size();
  if (g.channels % vec != 0) return false;
  for (const at::Tensor* t : tensors) {
    if (!aligned_to(t->data_ptr(), 16)) return false;
  }
  return true;
}

}  // namespace

at::Tensor pixel_unshuffle_cuda(const at::Tensor& x, int64_t factor) {
  check_factor(factor);
  IE_CHECK_DIM(x, 4);
  IE_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.size(1) % factor == 0 && x.size(2) % factor == 0, "x's h and w must be divisible by factor ", factor);
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g{x.size(1), x.size(2), x.size(3), factor};
  at::Tensor out = at::empty({x.size(0), g.out_h(), g.out_w(), g.row_width()}, x.options());
  permute_cuda(x, out, g, /*to_x=*/false);
  return out;
}

at::Tensor pixel_unshuffle_backward_cuda(const at::Tensor& grad, int64_t factor) {
  check_factor(factor);
  IE_CHECK_DIM(grad, 4);
  IE_CHECK_CONTIGUOUS(grad);
  TORCH_CHECK(grad.size(3) % (factor * factor) == 0, "grad's last dim must be divisible by factor^2");
  const c10::cuda::CUDAGuard guard(grad.device());
  const Geometry g{grad.size(1) * factor, grad.size(2) * factor, grad.size(3) / (factor * factor), factor};
  at::Tensor dx = at::empty({grad.size(0), g.h, g.w, g.channels}, grad.options());
  permute_cuda(dx, grad, g, /*to_x=*/true);
  return dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                              const at::Tensor& bias, double eps, int64_t factor) {
  check_layernorm_args(x, weight, bias, factor);
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g{x.size(1), x.size(2), x.size(3), factor};
  const int64_t width = g.row_width(), num_rows = x.size(0) * g.out_h() * g.out_w();
  const at::ScalarType acc_type = stats_type(x);
  at::Tensor out = at::empty({x.size(0), g.out_h() * g.out_w(), width}, x.options());
  at::Tensor mean = at::empty({num_rows}, x.options().dtype(acc_type));
  at::Tensor rstd = at::empty({num_rows}, x.options().dtype(acc_type));
  if (num_rows == 0 || width == 0) return {out, mean, rstd};
  TORCH_CHECK(num_rows <= INT32_MAX, "too many output rows for one launch");
  const at::Tensor w_acc = weight.to(acc_type).contiguous(), b_acc = bias.to(acc_type).contiguous();
  const bool vectorised = can_vectorise(g, {&x, &out});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_unshuffle_layernorm_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    dispatch_vec<scalar_t>(vectorised, [&](auto vec) {
      const RowLaunch launch = row_launch(width, decltype(vec)::value);
      dispatch_items(launch.items, [&](auto items) {
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
  check_layernorm_backward_args(grad, x, weight, mean, rstd, factor);
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g{x.size(1), x.size(2), x.size(3), factor};
  const int64_t width = g.row_width(), num_rows = x.size(0) * g.out_h() * g.out_w();
  const at::ScalarType acc_type = stats_type(x);
  at::Tensor dx = at::empty_like(x);
  if (num_rows == 0 || width == 0) {
    const at::Tensor zeros = at::zeros({width}, weight.options());
    return {dx, zeros, zeros.clone()};
  }
  const at::Tensor w_acc = weight.to(acc_type).contiguous();
  const bool vectorised = can_vectorise(g, {&x, &grad, &dx});
  at::Tensor partial_dw, partial_db;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_unshuffle_layernorm_backward_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    dispatch_vec<scalar_t>(vectorised, [&](auto vec) {
      const RowLaunch launch = row_launch(width, decltype(vec)::value);
      dispatch_items(launch.items, [&](auto items) {
        auto* kernel = layernorm_backward_kernel<scalar_t, acc_t, decltype(vec)::value, decltype(items)::value>;
        // As many blocks as fit on the GPU at once (each strides over rows): few partial rows to sum.
        int blocks_per_sm = 0;
        C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, launch.threads, 0));
        const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
        const int64_t blocks = std::min<int64_t>(num_rows, sms * std::max(1, blocks_per_sm));
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
