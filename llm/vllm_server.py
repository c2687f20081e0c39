"""The ``server`` mode's generation server: one process holding a vLLM engine, reached over HTTP by the trainer.

    python -m llm.vllm_server --model MODEL_DIR --port 8000 [--gpu-memory-utilization 0.9]   # on GPUs of its own
    python -m llm.vllm_server --model MODEL_DIR --engine transformers                           # no vLLM (CPU, protocol checks)

Then train with ``generation: {backend: vllm, vllm_mode: server, vllm_server_url: http://HOST:8000}``. The trainer's
side is :class:`llm.generation.ServerClient`; the routes (standard-library HTTP, one request at a time):

- ``GET /health`` → ``{"engine", "model", "dtype"}`` (the client casts weights to ``dtype`` before sending);
- ``POST /generate`` (JSON, :func:`llm.generation.parse_generation_request`) → ``{"completions", "logprobs"}``, one
  list per completion, ordered ``[p0 × G, p1 × G, ...]``;
- ``POST /load_weights`` (a safetensors file's bytes: tensors under vLLM's names) → ``{"tensors": n}``; the engine's
  prefix cache is dropped after each load.

Bad requests get 400 and ``{"error": one line}``; anything else that fails, 500. The vLLM engine here is the colocated
one (:class:`llm.generation.VLLMEngine`, ``external_launcher`` executor, tensor parallel size 1), so ``load_weights``
reaches the model it serves. Weights travel as HTTP bodies (no NCCL group, unlike TRL's server mode): simpler and
network-agnostic, at the cost of a host copy — about 16 GB per full sync of an 8B bf16 model, only the changed
tensors (LoRA: the merged adapted layers) afterwards.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Sequence

import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .generation import TransformersEngine, VLLMEngine, parse_generation_request

log = logging.getLogger(__name__)
ENGINES = ("vllm", "transformers")


def make_server(engine: Any, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving: call ``serve_forever``) exposing ``engine`` (a :class:`VLLMEngine` or
    :class:`TransformersEngine`); ``port`` 0 picks a free port (``server.server_address[1]``). Requests are handled
    one at a time (the engines are not thread-safe)."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, payload: Any) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/health":
                self._reply(200, engine.info())
            else:
                self._reply(404, {"error": f"no route GET {self.path}; routes: GET /health, POST /generate, POST /load_weights"})

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                with lock:
                    if self.path == "/generate":
                        try:
                            req = parse_generation_request(json.loads(body))
                        except json.JSONDecodeError as err:
                            raise ValueError(f"generate request is not JSON: {err}") from None
                        completions, logprobs = engine.generate(
                            req["prompts"], req["group_size"], req["seeds"], temperature=req["temperature"],
                            top_k=req["top_k"], top_p=req["top_p"], max_tokens=req["max_tokens"], greedy=req["greedy"])
                        nan_free = [[None if x != x else x for x in row] for row in logprobs]  # JSON has no NaN
                        self._reply(200, {"completions": completions, "logprobs": nan_free})
                    elif self.path == "/load_weights":
                        try:
                            tensors = safetensors.torch.load(body)
                        except Exception as err:  # safetensors raises its own error types for a bad file
                            raise ValueError(f"load_weights body is not a safetensors file: {err}") from None
                        engine.load_weights(tensors.items())
                        self._reply(200, {"tensors": len(tensors)})
                    else:
                        self._reply(404, {"error": f"no route POST {self.path}; routes: POST /generate, POST /load_weights"})
            except ValueError as err:
                self._reply(400, {"error": str(err)})
            except Exception as err:  # the server outlives one failed request and says what failed
                log.exception("request %s failed", self.path)
                self._reply(500, {"error": f"{type(err).__name__}: {err}"})

        def log_message(self, format: str, *args) -> None:  # one debug line per request instead of stderr noise
            log.debug("%s %s", self.address_string(), format % args)

    return ThreadingHTTPServer((host, port), Handler)


def build_engine(engine: str, model: str, dtype: str, *, gpu_memory_utilization: float = 0.9,
                 max_model_len: Optional[int] = None, enforce_eager: bool = False) -> Any:
    """The engine a server serves: ``vllm`` (:class:`VLLMEngine`, needs vLLM and a GPU) or ``transformers``
    (:class:`TransformersEngine`, on the GPU if there is one)."""
    if engine not in ENGINES:
        raise ValueError(f"--engine {engine!r} is not allowed; choose one of {', '.join(ENGINES)}")
    if engine == "vllm":
        return VLLMEngine(model, dtype, gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                          max_num_batched_tokens=None, enforce_eager=enforce_eager)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return TransformersEngine(hf.eval(), tokenizer, model)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llm.vllm_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a saved transformers model directory (the trainer's model.path)")
    p.add_argument("--engine", default="vllm", choices=ENGINES, help="vllm (default) or transformers (no vLLM; slow)")
    p.add_argument("--dtype", default="bfloat16", help="engine precision: bfloat16, float16, float32 or auto")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="share of the GPU vLLM may take")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens (default: the model's)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (faster start, slower decoding)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        engine = build_engine(args.engine, args.model, args.dtype, gpu_memory_utilization=args.gpu_memory_utilization,
                              max_model_len=args.max_model_len, enforce_eager=args.enforce_eager)
    except ValueError as err:
        p.error(str(err))
    server = make_server(engine, args.host, args.port)
    log.info("serving %s (%s engine) on http://%s:%d", args.model, args.engine, *server.server_address[:2])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
