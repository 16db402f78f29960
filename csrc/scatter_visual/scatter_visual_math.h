// Index math of scatter_visual, shared by the CPU and CUDA kernels.
// Token t takes visual row j = (number of visual tokens before t), an exclusive prefix sum of is_visual
// computed by the op (torch.cumsum) before the kernels run.
#pragma once

#include "common/host_device.h"

namespace ie {
namespace scatter_visual {

// Row of visual_embeds that token t takes, or -1 when t keeps its text row. `visual_before` is the
// exclusive prefix sum at t; rows outside [0, num_visual) are never read (the op checks the count matches,
// this bound-check guards direct callers).
IE_HOST_DEVICE int64_t source_row(bool is_visual, int64_t visual_before, int64_t num_visual) {
  return (is_visual && visual_before >= 0 && visual_before < num_visual) ? visual_before : -1;
}

}  // namespace scatter_visual
}  // namespace ie
