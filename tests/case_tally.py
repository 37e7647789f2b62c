"""How many cases a property test tried of each kind, and with what outcome: printed when the
module's tests end (`pytest -s` shows it), and a kind that never saw a good and a bad outcome
fails, since a property that never meets a bad case proves nothing."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterator

import pytest


class Tally(defaultdict[str, Counter[str]]):
    """kind -> outcome -> cases: `tally[kind][outcome] += 1`."""

    def __init__(self, module: str) -> None:
        super().__init__(Counter)
        self.module = module

    def saw(self, kind: str, good: str, *bad: str) -> None:
        """Print a kind's counts and fail unless it saw `good` and one of `bad`."""
        counts = self[kind]
        print(f"{kind}: {sum(counts.values())} cases {dict(sorted(counts.items()))}")
        assert counts[good] > 0 and any(counts[b] for b in bad), f"{kind}: {counts}"

    def summary(self) -> Callable[[], Iterator[None]]:
        """A module fixture (assign it to a name in the test module) that prints every
        kind's counts when the module's tests are done."""

        @pytest.fixture(scope="module", autouse=True)
        def printed() -> Iterator[None]:
            yield
            print(f"\ncases tried per kind ({self.module}):")
            for kind, counts in sorted(self.items()):
                print(f"  {kind:<22} {sum(counts.values()):>6}  {dict(sorted(counts.items()))}")

        return printed
