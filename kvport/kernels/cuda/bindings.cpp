// pybind11 surface of the native module (kvport._native_cuda / kvport._native_hip): raw pointers, sizes and
// stream handles only, so the module never links libtorch and works across torch versions.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

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
  m.def(
      "copy_bytes",
      [](std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, std::uintptr_t stream) {
        check(kvport::copy_bytes(dst, src, nbytes, stream), "copy_bytes");
      },
      py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("stream") = 0,
      "Copy nbytes between device-visible addresses with a kernel on the given stream handle.");
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
