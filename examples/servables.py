"""The README's servable example: find, describe and run the examples `dlhub up` publishes.

`dlhub up` builds and publishes them in the background (log: $DLHUB_HOME/examples.log) for the
owner `examples` (`examples/noop`, ...), apart from your own servables; this script waits until
they are ready, then calls each by name through the Executor and once over REST, and prints a
cold (first call: package fetch + load) vs warm latency. It checks every answer and exits
non-zero if one is wrong.
"""

import sys
import time

import numpy as np

from dlhub.executor import Client, Executor
from dlhub.executor.examples import featurize, mean_atomic_mass

OWNER = "examples"  # `dlhub up` publishes its examples for this owner
NAMES = [
    "noop",
    "composition-featurizer",
    "composition-rf",
    "diabetes-rf",
    "digits-cnn",
    "composition-pipeline",
]
PATIENT = [0.038, 0.051, 0.062, 0.022, -0.044, -0.035, -0.043, -0.003, 0.020, -0.018]  # 10 features
CALLS = {  # name -> (arguments, what the answer means)
    "noop": (("hello",), "its input, unchanged"),
    "composition-featurizer": (("Fe2O3",), "8 features of Fe2O3"),
    "composition-rf": (([featurize("Fe2O3")],), "mean atomic mass per atom from Fe2O3's features"),
    "diabetes-rf": ((PATIENT,), "one patient's disease progression after a year"),
    "digits-cnn": ((np.zeros((1, 1, 8, 8), dtype=np.float32),), "probabilities of digits 0-9, blank image"),
    "composition-pipeline": (("Fe2O3",), "featurizer -> random forest: mean atomic mass per atom"),
}
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    """Record a wrong answer (the script exits non-zero at the end) and say so at once."""
    if not ok:
        failures.append(what)
        print(f"  WRONG: {what}")


def wait_for_examples(client: Client, timeout_s: float = 300) -> list[str]:
    """The example names that are ready (waits for those still being built or verified)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = {r["name"]: r for r in client.search(owner=OWNER, limit=100)}
        missing = [n for n in NAMES if n not in found]
        if not missing or time.monotonic() > deadline:
            if missing:
                print(f"not published (see examples.log in $DLHUB_HOME): {', '.join(missing)}")
            return [n for n in NAMES if n in found]
        time.sleep(1)


def describe(client: Client, ref: str) -> None:
    info = client.describe(ref)
    rec = info["record"]
    versions = [v["version"] for v in info["versions"] if v["status"] == "ready"]
    print(f"describe {ref}:")
    print(f"  title:    {rec['title']}")
    print(f"  version:  {rec['version']} ({info['status']}; ready versions: {versions})")
    inputs = ", ".join(f"{i['type']} ({i.get('description', '')})" for i in rec["inputs"])
    print(f"  input:    {inputs}")
    print(f"  output:   {rec['output']['type']} ({rec['output'].get('description', '')})")
    print(f"  authors:  {', '.join(a['name'] for a in rec['authors'])}")
    check(info["status"] == "ready", f"{ref} is {info['status']}, not ready")


def shown(value) -> object:
    if isinstance(value, np.ndarray):
        return np.round(value.astype(float), 3).tolist()
    if isinstance(value, float):
        return round(value, 3)
    return value


def check_value(name: str, value, results: dict) -> None:
    """Each example's answer against what it must be."""
    if name == "noop":
        check(value == "hello", f"noop returned {value!r}")
    elif name == "composition-featurizer":
        check(value == featurize("Fe2O3"), f"composition-featurizer gave {value!r}")
    elif name == "composition-rf":
        check(np.shape(value) == (1,) and 1 < float(value[0]) < 250, f"composition-rf gave {value!r}")
    elif name == "diabetes-rf":
        check(isinstance(value, float) and 25 <= value <= 346, f"diabetes-rf gave {value!r}")  # target range
    elif name == "digits-cnn":
        check(
            np.shape(value) == (1, 10) and abs(float(np.sum(value)) - 1) < 1e-4, f"digits-cnn gave {value!r}"
        )
    elif name == "composition-pipeline" and "composition-rf" in results:
        expected = float(results["composition-rf"][0])  # the pipeline is featurizer -> rf, in one trip
        check(abs(value - expected) < 1e-9 * expected, f"composition-pipeline gave {value!r}, not {expected}")


def main() -> int:
    client = Client()  # REST URL + token from $DLHUB_HOME, written by `dlhub up`
    ready = wait_for_examples(client)
    print(f"examples published by `dlhub up` for the owner {OWNER!r}: {', '.join(ready)}")
    print("search 'random forest' (ready servables, best match first):")
    for hit in client.search("random forest"):
        print(f"  {hit['owner']}/{hit['name']}:{hit['version']} - {hit['title']}")
    if "composition-featurizer" in ready:
        describe(client, f"{OWNER}/composition-featurizer")

    print(
        "\ncalls by name through the Executor; latency of the first call (the endpoint fetches the package, "
        "a worker loads it), a warm call (cache=False: it runs again), and a repeat the manager answers "
        "from its result cache:"
    )
    results: dict[str, object] = {}
    with Executor(endpoint="local") as ex:
        for name in ready:
            args, meaning = CALLS[name]
            ref = f"{OWNER}/{name}"
            started = time.perf_counter()
            value = results[name] = ex.submit(ref, *args).result(timeout=120)
            first = time.perf_counter() - started
            started = time.perf_counter()
            ex.with_options(cache=False).submit(ref, *args).result(timeout=120)
            warm = time.perf_counter() - started
            started = time.perf_counter()
            ex.submit(ref, *args).result(timeout=120)
            hit = time.perf_counter() - started
            print(f"{ref}: {shown(value)}  ({meaning})")
            print(
                f"  first call {first * 1000:.1f} ms, warm {warm * 1000:.1f} ms, cached {hit * 1000:.1f} ms"
            )
            check_value(name, value, results)
        if "diabetes-rf" in ready:
            batched_rounds(ex)
    if "composition-pipeline" in ready:
        value = client.run(f"{OWNER}/composition-pipeline", "Fe2O3", endpoint="local")
        print(
            f"\nover REST (POST /api/v1/servables/{OWNER}/composition-pipeline/run, JSON in and out): "
            f"composition-pipeline('Fe2O3') = {value:.3f}, the predicted mean atomic mass per atom "
            f"(the element table gives {mean_atomic_mass('Fe2O3'):.3f})"
        )
        check(value == results.get("composition-pipeline", value), f"over REST the pipeline gave {value!r}")
    if failures:
        print(f"\n{len(failures)} wrong answer(s): {'; '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def batched_rounds(ex: Executor) -> None:
    """500 concurrent diabetes-rf calls (vectorized: the endpoint groups them into few predict()s),
    twice: the first round also warms the second worker, the second shows the steady state."""
    print(
        "\n500 concurrent diabetes-rf calls (one patient each; cache=False, so every call runs), grouped "
        "at the endpoint into a few predict() calls, twice:"
    )
    notes = {
        1: "the single calls above ran on one worker; this round's batches also go to the second, which "
        "first imports scikit-learn and loads the model (about a second, unless an earlier run warmed it)",
        2: "both workers warm: the steady state",
    }
    for round_ in (1, 2):
        patients = [[v + (i + 500 * round_) * 1e-4 for v in PATIENT] for i in range(500)]
        started = time.perf_counter()
        futures = [ex.with_options(cache=False).submit(f"{OWNER}/diabetes-rf", p) for p in patients]
        predictions = [f.result(timeout=120) for f in futures]
        elapsed = time.perf_counter() - started
        print(
            f"  round {round_}: {500 / elapsed:6,.0f} predictions/s ({elapsed:.2f} s, predictions "
            f"{min(predictions):.1f} .. {max(predictions):.1f})\n    {notes[round_]}"
        )
        check(all(25 <= p <= 346 for p in predictions), f"round {round_}: a prediction out of range")


if __name__ == "__main__":
    sys.exit(main())
