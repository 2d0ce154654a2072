"""Plain FastAPI + uvicorn calling the model: POST /predict/{name} {"x": ...} -> {"y": ...}.
Run: python fastapi_app.py PORT WORKERS BATCH MODEL_DIR (BATCH is ignored: no batching)."""

import os
import sys

from fastapi import FastAPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402

app = FastAPI()
MODELS = models.load(os.environ["EVAL_MODEL_DIR"]) if "EVAL_MODEL_DIR" in os.environ else {}


@app.post("/predict/{name}")
def predict(name: str, body: dict):
    return {"y": MODELS[name][0](body["x"])}


if __name__ == "__main__":
    import uvicorn

    port, workers, _batch, model_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    os.environ["EVAL_MODEL_DIR"] = model_dir
    uvicorn.run("fastapi_app:app", host="127.0.0.1", port=port, workers=workers, log_level="warning")
