// Host entry points of the native module, in plain C types so bindings.cpp needs no vendor header.
// Each returns nullptr on success or a static error string from the runtime.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvport {

// Copies nbytes from src to dst (device or device-mapped host addresses) with a kernel on `stream`.
const char* copy_bytes(std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, std::uintptr_t stream);

// Runtime facts for `kvport doctor`: device count and runtime/driver versions (0 when unknown).
const char* runtime_info(int* device_count, int* runtime_version, int* driver_version);

}  // namespace kvport
