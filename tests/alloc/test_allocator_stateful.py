"""Property test: random alloc / free / incref / bad calls against a reference model.

Two sizes: calls on at most ``SMALL`` blocks take the allocator's plain-Python path, larger ones
its vectorised path (runs by slice arithmetic, repeated ids by counting), so each machine drives
one of them."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mempool.alloc.allocator import SMALL, BlockAllocator
from mempool.errors import MemPoolError
from mempool.types import Blocks, Tier

CAPACITY = 24
OWNER = object()


class AllocatorMachine(RuleBasedStateMachine):
    capacity = CAPACITY
    most = 8  # ids per free / incref call

    def __init__(self) -> None:
        super().__init__()
        self.alloc = BlockAllocator(Tier.DEVICE, self.capacity, owner=OWNER)
        self.refs = [0] * self.capacity  # the reference model
        self.handed: list[list[int]] = []  # what allocate returned, as an engine keeps it
        self.errors = 0

    def held(self) -> list[int]:
        return [i for i, r in enumerate(self.refs) if r > 0]

    @rule(data=st.data())
    def allocate(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(0, self.capacity + 2))
        got = self.alloc.allocate(n)
        free = self.refs.count(0)
        if n > free:
            assert got is None
            return
        assert got is not None and len(got) == n
        ids = got.tolist()
        assert len(set(ids)) == n and ids == sorted(ids)
        for i in ids:
            assert self.refs[i] == 0
            self.refs[i] = 1
        if n:
            self.handed.append(ids)
        # runs: if a free run of length >= n existed, the result is one run
        if n and self._longest_free_run_before(ids) >= n:
            assert len(got.runs()) == 1

    def _longest_free_run_before(self, ids: list[int]) -> int:
        free = [r == 0 or i in ids for i, r in enumerate(self.refs)]
        best = cur = 0
        for f in free:
            cur = cur + 1 if f else 0
            best = max(best, cur)
        return best

    @precondition(lambda self: any(self.refs))
    @rule(data=st.data())
    def free_some(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(self.held()), min_size=1, max_size=self.most))
        counts = {i: ids.count(i) for i in ids}
        ok = all(self.refs[i] >= c for i, c in counts.items())
        if not ok:
            self._expect_error(lambda: self.alloc.free(Blocks(Tier.DEVICE, ids)))
            return
        released = self.alloc.free(Blocks(Tier.DEVICE, ids, owner=OWNER))
        for i, c in counts.items():
            self.refs[i] -= c
        assert released == sum(1 for i in counts if self.refs[i] == 0)

    @precondition(lambda self: any(self.refs))
    @rule(data=st.data())
    def incref_some(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(self.held()), min_size=1, max_size=max(4, self.most // 2)))
        self.alloc.incref(Blocks(Tier.DEVICE, ids))
        for i in ids:
            self.refs[i] += 1

    @precondition(lambda self: bool(self.handed))
    @rule(data=st.data())
    def free_what_allocate_gave(self, data: st.DataObject) -> None:
        """An engine frees the handle it was given (ascending runs), perhaps after sharing it."""
        ids = self.handed.pop(data.draw(st.integers(0, len(self.handed) - 1)))
        if not all(self.refs[i] > 0 for i in ids):  # freed since, id by id: now a double free
            self._expect_error(lambda: self.alloc.free(Blocks(Tier.DEVICE, ids, owner=OWNER)))
            return
        released = self.alloc.free(Blocks(Tier.DEVICE, ids, owner=OWNER))
        for i in ids:
            self.refs[i] -= 1
        assert released == sum(1 for i in ids if self.refs[i] == 0)

    @rule(
        data=st.data(),
        kind=st.sampled_from(["free", "incref", "foreign", "host"]),
    )
    def bad_or_random_call(self, data: st.DataObject, kind: str) -> None:
        """Random ids: valid calls must behave as the model says, invalid ones change nothing."""
        ids = data.draw(st.lists(st.integers(-3, self.capacity + 3), min_size=1, max_size=max(5, self.most)))
        in_range = all(0 <= i < self.capacity for i in ids)
        if kind == "foreign":
            self._expect_error(lambda: self.alloc.free(Blocks(Tier.DEVICE, [0], owner=object())))
        elif kind == "host":
            self._expect_error(lambda: self.alloc.free(Blocks(Tier.HOST, [0])))
        elif kind == "incref":
            if in_range and all(self.refs[i] > 0 for i in ids):
                self.alloc.incref(Blocks(Tier.DEVICE, ids))
                for i in ids:
                    self.refs[i] += 1
            else:
                self._expect_error(lambda: self.alloc.incref(Blocks(Tier.DEVICE, ids)))
        else:
            counts = {i: ids.count(i) for i in ids}
            if in_range and all(self.refs[i] >= c for i, c in counts.items()):
                self.alloc.free(Blocks(Tier.DEVICE, ids))
                for i, c in counts.items():
                    self.refs[i] -= c
            else:
                self._expect_error(lambda: self.alloc.free(Blocks(Tier.DEVICE, ids)))

    def _expect_error(self, call: object) -> None:
        before = (self.alloc._refs.tolist(), sorted(self.alloc._by_start.items()), self.alloc.num_free)
        try:
            call()  # type: ignore[operator]
        except MemPoolError:
            self.errors += 1
        else:
            raise AssertionError("a bad call did not raise")
        after = (self.alloc._refs.tolist(), sorted(self.alloc._by_start.items()), self.alloc.num_free)
        assert after == before, "a rejected call changed the allocator"

    @invariant()
    def matches_model(self) -> None:
        self.alloc.check_invariants()
        assert self.alloc._refs.tolist() == self.refs
        assert self.alloc.num_free + self.alloc.num_used == self.capacity
        assert self.alloc.num_free == self.refs.count(0)


class LargeCallsMachine(AllocatorMachine):
    """The same rules with calls of up to 3 x ``SMALL`` blocks: the vectorised path."""

    capacity = 4 * SMALL
    most = 3 * SMALL


TestAllocatorMachine = AllocatorMachine.TestCase
TestLargeCallsMachine = LargeCallsMachine.TestCase
