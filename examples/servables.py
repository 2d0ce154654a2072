"""The README's servable example: find, describe and run the examples `dlhub up` publishes.

`dlhub up` builds and publishes them in the background (log: $DLHUB_HOME/examples.log); this
script waits until they are ready, then calls each by name through the Executor and once over
REST, and prints a cold (first call: package fetch + load) vs warm latency.
"""

import time

import numpy as np

from dlhub.executor import Client, Executor

NAMES = [
    "noop",
    "composition-featurizer",
    "composition-rf",
    "diabetes-rf",
    "digits-cnn",
    "composition-pipeline",
]


def wait_for_examples(client: Client, owner: str, timeout_s: float = 300) -> list[str]:
    """The example names that are ready (waits for those still being built or verified)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = {r["name"]: r for r in client.search(owner=owner, limit=100)}
        missing = [n for n in NAMES if n not in found]
        if not missing or time.monotonic() > deadline:
            if missing:
                print(f"not published (see examples.log in $DLHUB_HOME): {', '.join(missing)}")
            return [n for n in NAMES if n in found]
        time.sleep(1)


def main() -> None:
    client = Client()  # REST URL + token from $DLHUB_HOME, written by `dlhub up`
    owner = client.whoami()
    ready = wait_for_examples(client, owner)
    for hit in client.search("random forest"):
        print(f"search 'random forest': {hit['owner']}/{hit['name']}:{hit['version']} - {hit['title']}")
    info = client.describe(f"{owner}/composition-featurizer")
    print(f"describe: {info['record']['title']} (status {info['status']}, inputs {info['record']['inputs']})")

    x = [0.038, 0.051, 0.062, 0.022, -0.044, -0.035, -0.043, -0.003, 0.020, -0.018]  # one patient
    calls = {
        "noop": ("hello",),
        "composition-featurizer": ("Fe2O3",),
        "composition-rf": ([[2.0, 5.0, 13.6, 8.0, 26.0, 18.0, 2.796, 1.61]],),
        "diabetes-rf": (x,),
        "digits-cnn": (np.zeros((1, 1, 8, 8), dtype=np.float32),),
        "composition-pipeline": ("NaCl",),
    }
    with Executor(endpoint="local") as ex:
        for name in ready:
            started = time.perf_counter()
            value = ex.submit(f"{owner}/{name}", *calls[name]).result(timeout=120)
            first = time.perf_counter() - started
            started = time.perf_counter()  # cache=False: the warm servable runs again
            ex.with_options(cache=False).submit(f"{owner}/{name}", *calls[name]).result(timeout=120)
            warm = time.perf_counter() - started
            started = time.perf_counter()  # deterministic: the manager answers from its cache
            ex.submit(f"{owner}/{name}", *calls[name]).result(timeout=120)
            hit = time.perf_counter() - started
            shown = np.round(value.astype(float), 3).tolist() if isinstance(value, np.ndarray) else value
            print(
                f"{owner}/{name}: {shown}  (first call {first * 1000:.1f} ms, warm {warm * 1000:.1f} ms, "
                f"cached {hit * 1000:.1f} ms)"
            )
        if "diabetes-rf" in ready:  # vectorized: 500 concurrent calls become a few predict() calls
            for round_ in (1, 2):  # round 1 also loads the model on the worker that has not yet
                patients = [[v + (i + 500 * round_) * 1e-4 for v in x] for i in range(500)]  # distinct
                started = time.perf_counter()
                futures = [ex.submit(f"{owner}/diabetes-rf", p) for p in patients]
                predictions = [f.result(timeout=120) for f in futures]
                elapsed = time.perf_counter() - started
                print(
                    f"round {round_}: 500 diabetes-rf calls, batched at the endpoint: "
                    f"{500 / elapsed:,.0f} predictions/s (predictions {min(predictions):.1f} .. "
                    f"{max(predictions):.1f})"
                )
    if "composition-pipeline" in ready:
        print("over REST:", client.run(f"{owner}/composition-pipeline", "Fe2O3", endpoint="local"))


if __name__ == "__main__":
    main()
