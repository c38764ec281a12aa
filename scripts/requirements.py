"""Write the image requirement files from pyproject.toml (used by the Dockerfile, before the source is copied).

requirements-api.txt: what the API process needs (no torch, transformers, triton or kernel toolchain).
requirements-worker.txt: everything but torch (installed first from the chosen index) and triton.
"""

import re
import sys

import tomllib

ENGINE_ONLY = {"torch", "transformers", "triton", "ninja", "gguf", "safetensors", "zstandard"}


def name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower()


def main(path: str = "pyproject.toml") -> None:
    with open(path, "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project["optional-dependencies"]
    # The engine's own dependencies and the service's extra; the worker also runs task evaluation (eval extra).
    deps = project["dependencies"] + extras["service"]
    # The API checks eval.tasks names against lm-eval's registry: lm-eval without its [hf] extra (no torch).
    api_eval = [re.sub(r"\[[^\]]*\]", "", d) for d in extras["eval"]]
    with open("requirements-api.txt", "w") as f:
        f.write("\n".join(d for d in deps + api_eval if name(d) not in ENGINE_ONLY) + "\n")
    with open("requirements-worker.txt", "w") as f:
        f.write("\n".join(d for d in deps + extras["eval"] if name(d) not in {"torch", "triton"}) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
