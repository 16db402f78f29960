// Argument checks for the kernel entry points. The Python ops validate user input with clear
// ValueError/TypeError messages first; these guard direct callers of torch.ops.internvl3_engine_C.
#pragma once

#include <ATen/ATen.h>

#define IE_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")
#define IE_CHECK_DTYPE(t, dtype) TORCH_CHECK((t).scalar_type() == (dtype), #t " must be " #dtype ", got ", (t).scalar_type())
#define IE_CHECK_DIM(t, n) TORCH_CHECK((t).dim() == (n), #t " must be " #n "-D, got ", (t).dim(), "-D")
#define IE_CHECK_SAME_DEVICE(a, b) \
  TORCH_CHECK((a).device() == (b).device(), #a " and " #b " must be on one device, got ", (a).device(), " and ", (b).device())
