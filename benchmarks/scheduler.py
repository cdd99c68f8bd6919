"""The scheduler's own cost: `python -m benchmarks.scheduler [N]`.

N requests (10 tenants, 3 priority bands, half with deadlines) are admitted at once
into a scheduler whose fake workers (4 of them, 8 slots each) are full, so all but
32 wait; then each running request is finished in turn, which dispatches the next,
until all N have run. Printed: the CPU seconds of the whole, and the same N items
through a plain `asyncio.Queue` (put, then get and task_done) measured in the same
run as the floor any asyncio admission path pays.
"""

from __future__ import annotations

import asyncio
import sys
import time

from llmos.scheduler.admission import AdmissionControl, Resolution, Ticket
from llmos.scheduler.history import Outcome
from llmos.scheduler.rotation import Endpoint

WORKERS = [Endpoint(f"w{i}", f"127.0.0.1:{i + 1}") for i in range(4)]


class _Registry:
    async def ready_endpoints(self, model: str, timeout: float | None) -> tuple[str, list[Endpoint]]:
        return "bench:latest", WORKERS

    async def resolve(self, name: str, timeout: float | None, route_key: str = "") -> Resolution:
        return Resolution("bench:latest", WORKERS)

    async def load(self, model: str, timeout: float | None, keep_alive: float | None = None,
                   hold: bool = False) -> list[Endpoint]:
        return WORKERS


async def scheduler_run(n: int) -> tuple[float, int]:
    scheduler = AdmissionControl(_Registry(), slots_per_worker=8, max_queue=n, aging_seconds=30.0)
    running: list[str] = []

    def admitted(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is None:
            running.append(task.result().request_id)

    started = time.process_time()
    tasks = []
    for i in range(n):
        ticket = Ticket(f"r{i}", "bench", tenant=f"t{i % 10}", priority=i % 3 - 1,
                        prompt_tokens=20 + i % 50, max_tokens=16 + i % 100)
        task = asyncio.create_task(scheduler.admit(ticket, timeout=600.0 if i % 2 else None))
        task.add_done_callback(admitted)
        tasks.append(task)
    await asyncio.sleep(0)
    finished = 0
    while finished < n:
        while not running:
            await asyncio.sleep(0)
        scheduler.finish(running.pop(0), tokens=50, outcome=Outcome.STOP)
        finished += 1
    await asyncio.gather(*tasks)
    return time.process_time() - started, scheduler.admitted_total


async def queue_run(n: int) -> float:
    queue: asyncio.Queue[int] = asyncio.Queue()
    started = time.process_time()

    async def put(i: int) -> None:
        await queue.put(i)

    await asyncio.gather(*(put(i) for i in range(n)))
    for _ in range(n):
        await queue.get()
        queue.task_done()
    return time.process_time() - started


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 10_000
    asyncio.run(scheduler_run(200))                       # warm
    cpu, admitted = asyncio.run(scheduler_run(n))
    floor = asyncio.run(queue_run(n))
    print(f"scheduler: {admitted} requests admitted, queued and dispatched in {cpu:.3f} s of CPU "
          f"({cpu / n * 1e6:.0f} us each)")
    print(f"asyncio.Queue floor: {floor:.3f} s of CPU; ratio {cpu / floor:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
