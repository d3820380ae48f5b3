// pybind11 surface of the native module (kvport._native_cuda / kvport._native_hip): raw pointers, sizes and
// stream handles only, so the module never links libtorch and works across torch versions.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "ops.h"

namespace py = pybind11;

namespace {

void check(const char* error, const char* what) {
  if (error != nullptr) throw std::runtime_error(std::string(what) + ": " + error);
}

}  // namespace

PYBIND11_MODULE(KVPORT_MODULE_NAME, m) {
  m.doc() = "kvport native copy kernels (built for " KVPORT_TARGET_NAME ")";
  m.attr("TARGET") = KVPORT_TARGET_NAME;
  m.attr("ARCHS") = KVPORT_TARGET_ARCHS;
  // Calls that can hold the host a while run without the GIL: the batched copy call costs the host ~0.9 us per
  // region in the driver whether or not the engines are busy (H200, 1024 x 32 KiB: ~900 us; docs/performance.md),
  // and the engine's other Python threads must not stop meanwhile. They touch no Python object.
  const py::call_guard<py::gil_scoped_release> no_gil;
  m.def(
      "copy_bytes",
      [](std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, std::uintptr_t stream) {
        check(kvport::copy_bytes(dst, src, nbytes, stream), "copy_bytes");
      },
      py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("stream") = 0,
      "Copy nbytes between device-visible addresses with a kernel on the given stream handle.");
  m.def(
      "gather",
      [](std::uintptr_t table, std::int64_t n_streams, std::uintptr_t blocks, std::uintptr_t chunk, int width,
         std::int64_t max_tiles, std::int64_t max_ctas, std::uintptr_t stream) {
        check(kvport::gather({table, n_streams, blocks, chunk, width, max_tiles, max_ctas, stream}), "gather");
      },
      py::arg("table"), py::arg("n_streams"), py::arg("blocks"), py::arg("chunk"), py::arg("width"),
      py::arg("max_tiles"), py::arg("max_ctas") = 0, py::arg("stream") = 0,
      "Engine memory -> canonical chunk over a segment table (kvport.hal.transfer.segments, anchor 0).");
  m.def(
      "scatter",
      [](std::uintptr_t table, std::int64_t n_streams, std::uintptr_t blocks, std::uintptr_t chunk, int width,
         std::int64_t max_tiles, std::int64_t max_ctas, std::uintptr_t stream) {
        check(kvport::scatter({table, n_streams, blocks, chunk, width, max_tiles, max_ctas, stream}), "scatter");
      },
      py::arg("table"), py::arg("n_streams"), py::arg("blocks"), py::arg("chunk"), py::arg("width"),
      py::arg("max_tiles"), py::arg("max_ctas") = 0, py::arg("stream") = 0,
      "Canonical chunk -> engine memory over a segment table; only addressed slots are written.");
  m.def(
      "memcpy_batch",
      [](std::uintptr_t dsts, std::uintptr_t srcs, std::uintptr_t sizes, std::size_t count, std::uintptr_t stream,
         bool batched, std::size_t max_batch, bool overlap) {
        check(kvport::memcpy_batch(reinterpret_cast<const std::uintptr_t*>(dsts),
                                   reinterpret_cast<const std::uintptr_t*>(srcs),
                                   reinterpret_cast<const std::size_t*>(sizes), count, stream, batched, max_batch,
                                   overlap),
              "memcpy_batch");
      },
      py::arg("dsts"), py::arg("srcs"), py::arg("sizes"), py::arg("count"), py::arg("stream") = 0,
      py::arg("batched") = true, py::arg("max_batch") = 0, py::arg("overlap") = false, no_gil,
      "Copy-engine copies of count regions; dsts/srcs/sizes are host addresses of 64-bit arrays.");
  m.def(
      "memcpy_template",
      [](std::uintptr_t eng_base, std::uintptr_t block_pos, std::uintptr_t block_stride, std::uintptr_t can_off,
         std::uintptr_t size, std::size_t count, const std::vector<std::int64_t>& ids, std::uintptr_t chunk,
         bool to_host, std::uintptr_t stream, std::size_t max_batch, bool overlap, std::uintptr_t after_stream,
         std::uintptr_t after_event) {
        auto p = [](std::uintptr_t a) { return reinterpret_cast<const std::int64_t*>(a); };
        check(kvport::memcpy_template({p(eng_base), p(block_pos), p(block_stride), p(can_off), p(size), count,
                                       ids.data(), ids.size(), chunk, to_host, stream, max_batch, overlap,
                                       {after_stream, after_event}}),
              "memcpy_template");
      },
      py::arg("eng_base"), py::arg("block_pos"), py::arg("block_stride"), py::arg("can_off"), py::arg("size"),
      py::arg("count"), py::arg("ids"), py::arg("chunk"), py::arg("to_host"), py::arg("stream"),
      py::arg("max_batch") = 0, py::arg("overlap") = false, py::arg("after_stream") = 0, py::arg("after_event") = 0,
      no_gil,
      "DMA of one chunk from a region template (host int64 arrays) and its flat block ids (a list), copy engines "
      "only, on `stream` after what after_stream has queued (through after_event; 0: no wait).");
  m.def(
      "staged_chunk",
      [](std::uintptr_t launches, std::size_t n_launches, const std::vector<std::int64_t>& ids,
         std::uintptr_t ids_host, std::uintptr_t ids_dev, std::uintptr_t staging, std::uintptr_t host,
         std::size_t nbytes, bool gather, std::uintptr_t kernel_stream, std::uintptr_t copy_stream,
         std::uintptr_t filled_event, std::uintptr_t freed_event, std::uintptr_t after_stream,
         std::uintptr_t after_event) {
        check(kvport::staged_chunk({reinterpret_cast<const std::int64_t*>(launches), n_launches, ids.data(),
                                    ids.size(), ids_host, ids_dev, staging, host, nbytes, gather, kernel_stream,
                                    copy_stream, filled_event, freed_event, {after_stream, after_event}}),
              "staged_chunk");
      },
      py::arg("launches"), py::arg("n_launches"), py::arg("ids"), py::arg("ids_host"), py::arg("ids_dev"),
      py::arg("staging"), py::arg("host"), py::arg("nbytes"), py::arg("gather"), py::arg("kernel_stream"),
      py::arg("copy_stream"), py::arg("filled_event"), py::arg("freed_event"), py::arg("after_stream") = 0,
      py::arg("after_event") = 0, no_gil,
      "One single-piece staged chunk: kernels on one stream, the host copy on another, a staging slot handed "
      "between them by two events, after the engine stream's queued work (see ops.h).");
  m.attr("HAS_BATCHED_MEMCPY") = kvport::has_batched_memcpy();
  m.def("runtime_info", []() {
    int count = 0, runtime = 0, driver = 0;
    const char* error = kvport::runtime_info(&count, &runtime, &driver);
    py::dict info;
    info["device_count"] = count;
    info["runtime_version"] = runtime;
    info["driver_version"] = driver;
    info["error"] = error == nullptr ? py::object(py::none()) : py::object(py::str(error));
    return info;
  });
}
