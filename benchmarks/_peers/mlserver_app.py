"""MLServer: one model per servable (V2 protocol, a BYTES input of JSON strings, one per request),
parallel_workers=WORKERS, adaptive batching when BATCH > 1.
Run: python mlserver_app.py PORT WORKERS BATCH MODEL_DIR (writes a model repository, then runs
`mlserver start` on it)."""

import json
import os
import sys
import tempfile
from pathlib import Path

from mlserver import MLModel
from mlserver.codecs import StringCodec
from mlserver.types import InferenceRequest, InferenceResponse

HERE = os.path.dirname(os.path.abspath(__file__))


class Runtime(MLModel):
    async def load(self) -> bool:
        sys.path.insert(0, HERE)
        import models

        self.many = models.load(os.environ["EVAL_MODEL_DIR"])[self.settings.parameters.extra["servable"]][1]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        xs = [json.loads(s) for s in StringCodec.decode_input(payload.inputs[0])]
        ys = [json.dumps(y) for y in self.many(xs)]
        return InferenceResponse(model_name=self.name, outputs=[StringCodec.encode_output("y", ys)])


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    import models

    port, workers, batch, model_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    repo = Path(tempfile.mkdtemp(prefix="mlserver-repo-"))
    (repo / "settings.json").write_text(
        json.dumps(
            {
                "http_port": port,
                "grpc_port": port + 1,
                "metrics_port": port + 2,
                "parallel_workers": workers,
                "host": "127.0.0.1",
                "debug": False,
            }
        )
    )
    for name in models.NAMES:
        (repo / name).mkdir()
        settings = {
            "name": name,
            "implementation": "mlserver_app.Runtime",
            "parameters": {"extra": {"servable": name}},
        }
        if batch > 1:
            settings.update(max_batch_size=batch, max_batch_time=0.002)
        (repo / name / "model-settings.json").write_text(json.dumps(settings))
    env = {**os.environ, "EVAL_MODEL_DIR": model_dir, "PYTHONPATH": HERE}

    bin_ = Path(sys.executable).parent / "mlserver"
    os.chdir(HERE)
    os.execve(str(bin_), [str(bin_), "start", str(repo)], env)
