"""Many threads acquiring one key at once: how many a limiter admits (in-process and shared limiters)."""

from __future__ import annotations

import threading

from potstill.guard.ratelimit import RateLimited


def admitted_by_threads(lim, threads: int = 10, each: int = 100) -> int:
    """Requests admitted when `threads` threads each try `each` acquisitions of one key at once."""
    ok = []

    def worker():
        for _ in range(each):
            try:
                lim.acquire("k", tokens=1)
                ok.append(1)
            except RateLimited:
                pass

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return len(ok)
