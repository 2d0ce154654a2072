"""Ray Serve: POST /predict {"name": ..., "x": ...} -> {"y": ...}; BATCH > 1 uses @serve.batch.
Run: python ray_app.py PORT WORKERS BATCH MODEL_DIR (blocks until killed)."""

import os
import sys
import time

import ray
from ray import serve
from starlette.requests import Request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
port, workers, batch, model_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]


@serve.deployment(num_replicas=workers, max_ongoing_requests=max(batch * 2, 64))
class Model:
    def __init__(self):
        sys.path.insert(0, HERE)
        import models

        self.models = models.load(model_dir)

    @serve.batch(max_batch_size=max(batch, 1), batch_wait_timeout_s=0.002)
    async def many(self, items):
        out = [None] * len(items)
        groups = {}
        for i, (name, _) in enumerate(items):
            groups.setdefault(name, []).append(i)
        for name, idx in groups.items():
            for i, y in zip(idx, self.models[name][1]([items[i][1] for i in idx])):
                out[i] = y
        return out

    async def __call__(self, request: Request):
        body = await request.json()
        if batch > 1:
            return {"y": await self.many((body["name"], body["x"]))}
        return {"y": self.models[body["name"]][0](body["x"])}


if __name__ == "__main__":
    ray.init(
        num_cpus=max(2, workers + 1), include_dashboard=False, runtime_env={"env_vars": dict(os.environ)}
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Model.bind(), route_prefix="/predict")
    print("ready", flush=True)
    while True:
        time.sleep(3600)
