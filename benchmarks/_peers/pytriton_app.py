"""NVIDIA PyTriton: one Triton model per servable (a BYTES input of JSON strings), WORKERS
instances each, Triton's dynamic batcher when BATCH > 1. HTTP on PORT (Triton's KServe V2 API).
Run: python pytriton_app.py PORT WORKERS BATCH MODEL_DIR (blocks until killed)."""

import json
import os
import sys

import numpy as np
from pytriton.decorators import batch as batch_decorator
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import models  # noqa: E402


def make_infer(many):
    @batch_decorator
    def infer(x):
        xs = [json.loads(row[0].decode()) for row in x]
        ys = [json.dumps(y).encode() for y in many(xs)]
        return {"y": np.array(ys, dtype=object).reshape(-1, 1)}

    return infer


if __name__ == "__main__":
    port, workers, batch, model_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    table = models.load(model_dir)
    config = TritonConfig(http_address="127.0.0.1", http_port=port, grpc_port=port + 1, metrics_port=port + 2)
    with Triton(config=config) as triton:
        for name in models.NAMES:
            triton.bind(
                model_name=name,
                infer_func=[make_infer(table[name][1]) for _ in range(workers)],
                inputs=[Tensor(name="x", dtype=bytes, shape=(1,))],
                outputs=[Tensor(name="y", dtype=bytes, shape=(1,))],
                config=ModelConfig(
                    max_batch_size=max(batch, 1),
                    batcher=DynamicBatcher(max_queue_delay_microseconds=2000) if batch > 1 else None,
                ),
            )
        print("ready", flush=True)
        triton.serve()
