// gather: paged engine memory -> canonical chunk (device staging, or pinned host through its mapped address).
// One op per file; the kernel itself lives in segment_copy.cuh and is shared with scatter.cu.
#include "segment_copy.cuh"

namespace kvport {

const char* gather(const SegmentArgs& args) { return detail::segment_copy<true>(args); }

}  // namespace kvport
