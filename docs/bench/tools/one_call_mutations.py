"""Device: mutation check of the one-call ordering tests: with one wait switched off, the tests that guard it must
fail (exit status 1). Run from the repository root. usage: one_call_mutations.py freed|released|after"""

import sys

import pytest
import torch

from kvport.hal.transfer import one_call

mode = sys.argv[1]
orig_init, orig_issue = one_call.OneCallChunks.__init__, one_call.OneCallChunks.issue


def init(self, *a, **k):
    orig_init(self, *a, **k)
    if mode == "after":
        self._after_event = 0


if mode == "released":  # wait_on waits for the whole store again
    from kvport.hal import completion

    orig_ec = completion.EventCompletion.__init__

    def ec_init(self, *a, **k):
        orig_ec(self, *a, **k)
        self.released = self.event

    completion.EventCompletion.__init__ = ec_init


def issue(self, *a, **k):
    done = orig_issue(self, *a, **k)
    if mode == "freed":  # the slot just used counts as freed at once: the next chunk on it does not wait
        slot = (self._next_slot - 1) % one_call.STAGING_SLOTS
        self._events[2 + 2 * slot].record(torch.cuda.Stream())
    return done


one_call.OneCallChunks.__init__ = init
one_call.OneCallChunks.issue = issue
tests = {
    "freed": ["tests/hal/transfer/test_one_call_gpu.py::test_consecutive_chunks_reuse_a_slot_only_after_its_reader"],
    "released": ["tests/hal/transfer/test_one_call_gpu.py::test_a_store_releases_engine_memory_before_its_copy_lands"],
    "after": [
        "tests/hal/transfer/test_one_call_gpu.py::test_waits_for_the_engines_current_side_stream",
        "tests/hal/test_backends_gpu.py::test_gather_waits_for_the_engine_stream",
    ],
}[mode]
sys.exit(pytest.main([*tests, "-q", "-p", "no:cacheprovider", "-W", "ignore"]))
