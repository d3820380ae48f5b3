"""Test backends with scripted availability, registered under a private table for registry tests."""

from kvport.hal.backend import Backend, Verdict


class _Scripted(Backend):
    ok = True
    why = "ok"
    is_expected = False

    def available(self, platform):
        return Verdict(self.ok, self.why)

    def expected(self, platform):
        return self.is_expected

    def gather(self, descriptor, block_ids, dst, num_tokens):
        raise AssertionError("registry tests never copy")

    scatter = gather


class Fast(_Scripted):
    name, priority, ok, why = "fast", 20, False, "native module not built"


class FastExpected(Fast):
    name, is_expected, why = "fast", True, "built for this platform but does not load: bad ELF"


class Medium(_Scripted):
    name, priority = "medium", 10


class Slow(_Scripted):
    name, priority = "slow", 0


class NoLayout(_Scripted):
    name, priority = "nolayout", 15

    def supports(self, descriptor):
        return Verdict.no("opaque blocks not supported")
