"""The sentence-transformers peer: a FastAPI app the way the tutorials write it.

``SentenceTransformer`` loaded once at import (torch on the CPU, its default threads), a
pydantic request model, a plain ``def`` handler, ``.tolist()`` into default JSON. Served by
``uvicorn --workers N``. The model comes from ``$BENCH_ST_MODEL`` (the same all-MiniLM-L6-v2
checkpoint the appliance's ONNX graph is built from).

``BENCH_TORCH_THREADS`` set gives torch that many threads per worker (the
``st-fastapi-tuned`` configuration): by default each worker uses every core.
"""

import os
from typing import List

from fastapi import FastAPI
from pydantic import BaseModel
from sentence_transformers import SentenceTransformer

if os.environ.get("BENCH_TORCH_THREADS"):
    import torch

    torch.set_num_threads(int(os.environ["BENCH_TORCH_THREADS"]))

model = SentenceTransformer(os.environ["BENCH_ST_MODEL"], device="cpu")
app = FastAPI()


class EmbedRequest(BaseModel):
    inputs: str | List[str]


@app.post("/embed")
def embed(request: EmbedRequest) -> List[List[float]]:
    texts = [request.inputs] if isinstance(request.inputs, str) else request.inputs
    return model.encode(texts, normalize_embeddings=True).tolist()
