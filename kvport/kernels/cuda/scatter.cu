// scatter: canonical chunk -> paged engine memory; writes only the addressed slots (tails are masked).
// One op per file; the kernel itself lives in segment_copy.cuh and is shared with gather.cu.
#include "segment_copy.cuh"

namespace kvport {

const char* scatter(const SegmentArgs& args) { return detail::segment_copy<false>(args); }

}  // namespace kvport
