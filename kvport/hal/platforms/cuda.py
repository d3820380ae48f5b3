"""NVIDIA (CUDA) and AMD (ROCm) platforms: torch.cuda streams and events, pinned host memory, mapped-host kernels.
Owns the torch.cuda calls of the data path; must not create a device context at import."""

from __future__ import annotations

from kvport.hal.platforms.base import StreamPlatform


class CudaPlatform(StreamPlatform):
    name = "cuda"
    kernels_address_host = True  # UVA: a pinned host pointer is valid in device code
    native_target = "cuda"
    # Host events block: the completion watcher sleeps until a transfer ends instead of spinning a core; recording
    # one costs ~1% of a back-to-back one-chunk DMA transfer (H200, docs/bench/tools/event_hops.py).
    host_event_kwargs = {"blocking": True}

    def __init__(self) -> None:
        self._streams: dict = {}  # torch's (stream id, device index, device type) -> its Stream object
        self._current_key = None  # torch._C._cuda_getCurrentStream once torch.cuda is initialized, else None
        self._current_raw = None  # torch._C._cuda_getCurrentRawStream, likewise

    def _api(self):
        import torch

        return torch.cuda

    def current_stream(self, device):
        """torch.cuda.current_stream(device) without building a new Stream object per call: that call costs 6.6 us
        of host time (H200, docs/performance.md) and every transfer and ``wait_on`` asks once. The first call goes
        through torch (it initializes CUDA); later ones look the stream's identity up (torch's private binding,
        where this torch has it) and reuse the Stream object made for it."""
        index = device if isinstance(device, int) else getattr(device, "index", None)
        if index is None or self._current_key is None:
            stream = self._api().current_stream(device)
            self._bind_current()
            return stream
        key = self._current_key(index)
        stream = self._streams.get(key)
        if stream is None:
            if len(self._streams) > 64:
                self._streams.clear()
            stream = self._streams[key] = self._api().Stream(stream_id=key[0], device_index=key[1], device_type=key[2])
        return stream

    def current_stream_handle(self, index: int) -> int:
        """The raw handle (cudaStream_t / hipStream_t) of device ``index``'s current stream."""
        if self._current_raw is None:
            self._bind_current()
            if self._current_raw is None:
                return self._api().current_stream(index).cuda_stream
        return self._current_raw(index)

    def stream_handle(self, stream) -> int:
        return stream.cuda_stream

    def event_handle(self, event) -> int:
        """The raw handle of an event that was recorded at least once (torch creates CUDA events lazily)."""
        return event.cuda_event

    def _bind_current(self) -> None:
        import torch

        if self._current_key is None and torch.cuda.is_initialized():
            self._current_key = getattr(torch._C, "_cuda_getCurrentStream", None)
            self._current_raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)

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
