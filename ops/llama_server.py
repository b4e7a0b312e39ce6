"""Runs llama.cpp's own llama-server (from the xllamacpp wheel) with a real model.

The wheel has no command line, so this builds its CommonParams and serves until
SIGTERM. Used by the tests and the demo as the real inference engine; vLLM,
Ollama and LM Studio speak the same OpenAI API.

usage: llama_server.py --model PATH --port N [--alias NAME] [--ctx N] [--slots N] [--threads N]
"""

import argparse
import signal
import threading

import xllamacpp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--alias", default="smollm2-135m")
    ap.add_argument("--ctx", type=int, default=8192, help="context, split between slots")
    ap.add_argument("--slots", type=int, default=4)
    # One thread: on a 2-core machine two threads collapsed to 4-12 tok/s.
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    p = xllamacpp.CommonParams()
    p.model.path = args.model
    p.hostnames = ["127.0.0.1"]
    p.port = args.port
    p.n_ctx = args.ctx
    p.n_parallel = args.slots
    p.cpuparams.n_threads = args.threads
    p.cpuparams_batch.n_threads = args.threads
    p.endpoint_metrics = True
    p.use_jinja = True
    p.model_alias = {args.alias}

    server = xllamacpp.Server(p)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    del server


if __name__ == "__main__":
    main()
