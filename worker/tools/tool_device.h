// --device for the engine's tools: "cpu" (the default), "cuda" or "cuda:N". A device this LibTorch
// build cannot use is refused before any work starts, with the flag's name, as ParseToolArgs
// reports other bad values (exit code 2):
//
//   else if (k == "--device") a.device = ParseToolDevice(v());
//
// Header-only: every .cc in worker/tools/ is a tool of its own.
#ifndef PERFUSION_WORKER_TOOLS_TOOL_DEVICE_H_
#define PERFUSION_WORKER_TOOLS_TOOL_DEVICE_H_

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <torch/cuda.h>

#include <string>

#include "tools/tool_args.h"

namespace perfusion {

inline c10::Device ParseToolDevice(const std::string& s) {
  c10::Device d(c10::kCPU);
  try {
    d = c10::Device(s);
  } catch (const c10::Error&) {
    throw ToolUsageError("--device: '" + s + "' is not a device (cpu, cuda, cuda:1, ...)");
  }
  if (!d.is_cpu() && !d.is_cuda()) throw ToolUsageError("--device: only cpu and cuda are supported, got '" + s + "'");
  if (d.is_cuda()) {
    if (!torch::cuda::is_available()) {
      throw ToolUsageError("--device " + s +
                           ": this LibTorch has no CUDA support or sees no GPU (Debian's LibTorch is CPU-only; "
                           "build against a CUDA LibTorch, see docs/deploy.md)");
    }
    const int n = static_cast<int>(torch::cuda::device_count());
    if (d.has_index() && d.index() >= n) {
      throw ToolUsageError("--device " + s + ": only " + std::to_string(n) + " GPU(s) visible");
    }
  }
  return d;
}

}  // namespace perfusion

#endif  // PERFUSION_WORKER_TOOLS_TOOL_DEVICE_H_
