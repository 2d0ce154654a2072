"""LitServe: POST /predict {"name": ..., "x": ...} -> {"y": ...}; BATCH > 1 turns on its batching.
Run: python litserve_app.py PORT WORKERS BATCH MODEL_DIR"""

import os
import sys

import litserve as ls

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402


class API(ls.LitAPI):
    def setup(self, device):
        self.models = models.load(os.environ["EVAL_MODEL_DIR"])

    def decode_request(self, request):
        return (request["name"], request["x"])

    def predict(self, x):
        if isinstance(x, tuple):
            return self.models[x[0]][0](x[1])
        out = [None] * len(x)  # a batch: one model call per servable named in it
        groups = {}
        for i, (name, _value) in enumerate(x):
            groups.setdefault(name, []).append(i)
        for name, idx in groups.items():
            for i, y in zip(idx, self.models[name][1]([x[i][1] for i in idx])):
                out[i] = y
        return out

    def encode_response(self, y):
        return {"y": y}


if __name__ == "__main__":
    port, workers, batch, model_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    os.environ["EVAL_MODEL_DIR"] = model_dir
    kw = {"max_batch_size": batch, "batch_timeout": 0.002} if batch > 1 else {}
    server = ls.LitServer(API(**kw), accelerator="cpu", workers_per_device=workers)
    server.run(host="127.0.0.1", port=port, generate_client_file=False)
