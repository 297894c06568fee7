"""``python -m bench.profile FILE [N]``: where a py-spy raw profile (``--profile DIR``) spends busy time.

Samples whose innermost frame is a thread waiting (an idle executor worker,
the event loop in epoll, a parked vCPU) are counted apart; the shares are of
the busy samples, by innermost frame (self) and by any frame (inclusive).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

IDLE = ("_worker (concurrent/futures/thread.py:81)", "EpollSelector.select", "Condition.wait (threading.py",
        "Event.wait", "_queue", "Thread._wait_for_tstate_lock")
PLUMBING = ("Thread.", "BaseEventLoop.run", "Runner.", "run (", "_run", "main (", "<module>", "thread (")


def summary(path: Path, top: int = 25) -> str:
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    busy = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        if frames[-1].startswith(IDLE):
            idle += n
            continue
        busy += n
        own[frames[-1]] += n
        for f in set(frames):
            if not f.startswith(PLUMBING):
                incl[f] += n
    out = [f"{path}: {busy} busy samples ({idle} idle left out)", "self:"]
    out += [f"  {v / busy:6.1%} {k}" for k, v in own.most_common(top)]
    out += ["inclusive:"] + [f"  {v / busy:6.1%} {k}" for k, v in incl.most_common(2 * top)]
    return "\n".join(out)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 25))
