# ruff: noqa: E401, E702, E731  (kept as run)
"""Device: host time of the stream/event operations a one-call staged chunk makes (torch.cuda API), medians of 2000."""

import statistics
import time

import torch

dev = torch.device("cuda")
a = torch.cuda.Stream(priority=-1)
b = torch.cuda.Stream()
x = torch.zeros(1 << 20, device=dev)
torch.cuda.synchronize()


def med(fn, n=2000):
    out = []
    for _ in range(n):
        s = time.perf_counter()
        fn()
        out.append(time.perf_counter() - s)
    return statistics.median(out) * 1e6


busy = lambda: torch.cuda._sleep(1000)
ev = torch.cuda.Event(blocking=True)
ev.record(b)
cases = {
    "current_stream": lambda: torch.cuda.current_stream(),
    "stream.query (idle)": lambda: a.query(),
    "Event() + record": lambda: torch.cuda.Event(blocking=True).record(a),
    "stream.wait_event": lambda: a.wait_event(ev),
    "stream.wait_stream": lambda: a.wait_stream(b),
    "event.query": lambda: ev.query(),
    "set_stream x2": lambda: (torch.cuda.set_stream(a), torch.cuda.set_stream(torch.cuda.default_stream())),
    "small kernel launch": lambda: x.add_(1),
    "torch.tensor(16 ints)": lambda: torch.tensor(list(range(16)), dtype=torch.int64),
}
for name, fn in cases.items():
    print(f"{name:24s} {med(fn):6.2f} us")
    torch.cuda.synchronize()
