"""NVIDIA (CUDA) and AMD (ROCm) platforms: torch.cuda streams and events, pinned host memory, mapped-host kernels.
Owns the torch.cuda calls of the data path; must not create a device context at import."""

from __future__ import annotations

from kvport.hal.platforms.base import StreamPlatform


class CudaPlatform(StreamPlatform):
    name = "cuda"
    kernels_address_host = True  # UVA: a pinned host pointer is valid in device code
    native_target = "cuda"
    # blocking=True: a host thread waiting on an event sleeps instead of spinning a core (the completion watcher
    # waits on every transfer).
    event_kwargs = {"blocking": True}

    def _api(self):
        import torch

        return torch.cuda

    def register_host(self, tensor) -> bool:
        """cudaHostRegister (hipHostRegister on ROCm, through torch's cudart binding) of the tensor's pages, so
        copy engines and mapped-host kernels address them like cudaHostAlloc memory. Raises if the runtime refuses
        (e.g. a limit on locked memory): a silent unpinned fallback would halve transfer speed unnoticed."""
        if tensor.is_pinned():
            return True
        cudart = self._api().cudart()
        nbytes = tensor.numel() * tensor.element_size()
        # flags 0 = cudaHostRegisterDefault; mapped and portable by default under UVA.
        err = cudart.cudaHostRegister(tensor.data_ptr(), nbytes, 0)
        code = int(getattr(err, "value", err))
        if code != 0:
            # The runtime keeps this as its last error, and torch's next kernel-launch check reports it against an
            # unrelated kernel (seen on the H200): a refused registration must end the caller's setup, not be caught
            # and carried on from (torch's cudart binding has no cudaGetLastError to clear it).
            raise RuntimeError(f"{self.name}: host register of {nbytes} bytes failed with error {code}")
        return True

    def unregister_host(self, tensor) -> None:
        self._api().cudart().cudaHostUnregister(tensor.data_ptr())


class RocmPlatform(CudaPlatform):
    """ROCm torch exposes HIP through the torch.cuda API; the native target is the HIP build of the same kernels."""

    name = "rocm"
    native_target = "hip"
