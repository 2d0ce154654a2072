"""The README example: run plain Python functions on the `local` endpoint started by `dlhub up`."""

import platform
import time

from dlhub.executor import Executor


def square(x):
    return x * x


def where_am_i():
    import os
    import socket

    return f"{socket.gethostname()} pid {os.getpid()}"


def main() -> None:
    with Executor(endpoint="local") as ex:  # manager address + token come from $DLHUB_HOME
        fut = ex.submit(square, 7)
        print("square(7) =", fut.result(timeout=60), f"(task {fut.task_id})")
        print("map(square, range(10)) =", list(ex.map(square, range(10), timeout=60)))
        print("ran on:", ex.submit(where_am_i).result(timeout=60), "| client:", platform.node())

        started = time.perf_counter()
        futures = [ex.submit(square, i) for i in range(5000)]
        total = sum(f.result(timeout=120) for f in futures)
        elapsed = time.perf_counter() - started
        print(f"5,000 tasks: sum of squares = {total} in {elapsed:.2f} s ({5000 / elapsed:,.0f} tasks/s)")
        info = ex.task_info(fut)
        print(f"task {fut.task_id}: state {info['state']}")


if __name__ == "__main__":
    main()
