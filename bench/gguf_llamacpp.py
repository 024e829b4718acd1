"""The GGUF a user gets, run in llama.cpp itself: SmolLM2-135M with four blocks cut, written by
`surgery gguf` as f16 and q8_0, against the pruned model in transformers on one prompt (tokens,
next-token distributions, greedy text).

    python bench/gguf_llamacpp.py [--llama-python PATH]

llama.cpp comes from llama-cpp-python, which pip builds from source (about an hour on 2 cores):
`python -m venv /tmp/llama && /tmp/llama/bin/pip install llama-cpp-python`, then pass
--llama-python /tmp/llama/bin/python. It runs in its own process and writes its logits to a file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import protocol, save, setup

PROMPT = "The capital of France is Paris. The capital of Italy is"
REMOVE = "L20-L23"
NEW_TOKENS = 12
_RUNNER = """
import json, sys
import llama_cpp
from llama_cpp import Llama
path, prompt, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False, n_threads=2)
tokens = llm.tokenize(prompt.encode(), add_bos=False)
llm.eval(tokens)
logits = [list(map(float, row)) for row in llm.scores[:len(tokens)]]
llm.reset()
text = llm.create_completion(prompt, max_tokens=new_tokens, temperature=0.0)["choices"][0]["text"]
print(json.dumps({"tokens": tokens, "logits": logits, "text": text, "version": llama_cpp.__version__}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-python", default=sys.executable, help="a Python with llama-cpp-python installed")
    args = parser.parse_args()
    setup(2)
    import torch

    from surgery.export import load_exported
    from surgery.export_gguf import export_gguf
    from surgery.pipeline import cut_and_export

    work = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    folder = work / "smollm2-cut"
    cut_and_export("smollm2-135m", REMOVE, folder, device="cpu")
    model = load_exported(folder)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model(ids).logits[0].float()
        greedy = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected_text = tokenizer.decode(greedy[0, ids.shape[1]:])
    rows = {}
    for dtype in ("f16", "q8_0"):
        written = export_gguf(folder, work / f"smollm2-cut-{dtype}.gguf", dtype=dtype)
        run = subprocess.run([args.llama_python, "-c", _RUNNER, str(written.path), PROMPT, str(NEW_TOKENS)],
                             capture_output=True, text=True, check=False)
        if run.returncode != 0:
            sys.exit(f"llama.cpp failed on {written.path}: {run.stderr.strip().splitlines()[-1] if run.stderr else run.returncode}"
                     " (install llama-cpp-python and pass --llama-python)")
        result = json.loads(run.stdout.strip().splitlines()[-1])
        logits = torch.tensor(result["logits"])
        kl = torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1)
        rows[dtype] = {"bytes": written.bytes, "tokens_equal": result["tokens"] == ids[0].tolist(),
                       "max_kl": kl.max().item(), "argmax_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
                       "greedy_text": result["text"], "greedy_equal": result["text"] == expected_text,
                       "llama_cpp_python": result["version"]}
        print(dtype, {k: v for k, v in rows[dtype].items() if k != "greedy_text"}, flush=True)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    save("gguf_llamacpp", {"removed": REMOVE, "prompt": PROMPT, "new_tokens": NEW_TOKENS, "transformers_text": expected_text,
                           "formats": rows, "protocol": protocol()})


if __name__ == "__main__":
    main()
