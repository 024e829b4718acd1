"""The GGUF a user gets, run in llama.cpp itself: SmolLM2-135M with four blocks cut, written by
`surgery gguf` as f16 and q8_0, against the pruned model in transformers on one prompt (tokens,
next-token distributions, greedy tokens); and the same model given Llama 3.1's rope scaling, which
only llama.cpp can check (transformers' GGUF reader ignores the rope_freqs tensor), with a file
lacking that tensor as the negative control.

Then SmolLM2 with four attention and two FFN sublayers cut (not L0.attn), written by `surgery cut`
in both checkpoint layouts (hf and nemotron-nas) and by `surgery gguf` in llama.cpp's deci layout,
against the same cut in transformers; with a negative control: the same file with the removed FFNs
written as width 0 (no tensors), which llama.cpp's deci graph answers by dropping those blocks'
attention output.

    python bench/gguf_llamacpp.py [--llama-python PATH]

llama.cpp comes from llama-cpp-python, which pip builds from source (about an hour on 2 cores):
`python -m venv /tmp/llama && /tmp/llama/bin/pip install llama-cpp-python`, then pass
--llama-python /tmp/llama/bin/python. It runs in its own process and writes its logits to a file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import protocol, save, setup

PROMPT = "The capital of France is Paris. The capital of Italy is"
REMOVE = "L20-L23"
SUBLAYERS = "L6.attn,L10.attn,L14.attn,L18.attn,L8.mlp,L22.mlp"
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
generated = []
for _ in range(new_tokens):
    generated.append(int(llm.scores[llm.n_tokens - 1].argmax()))
    llm.eval([generated[-1]])
print(json.dumps({"tokens": tokens, "logits": logits, "generated": generated, "version": llama_cpp.__version__}))
"""


def run_llama_cpp(python: str, path: Path, prompt: str) -> dict:
    run = subprocess.run([python, "-c", _RUNNER, str(path), prompt, str(NEW_TOKENS)], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        sys.exit(f"llama.cpp failed on {path}: {run.stderr.strip().splitlines()[-1] if run.stderr else run.returncode}"
                 " (install llama-cpp-python and pass --llama-python)")
    return json.loads(run.stdout.strip().splitlines()[-1])


def compare(python: str, folder: Path, gguf_path: Path, prompt: str) -> dict:
    """llama.cpp on the GGUF against transformers on the folder: tokens, next-token distributions, greedy text."""
    import torch
    from transformers import AutoTokenizer

    from surgery.export.checkpoint import load_exported

    model, tokenizer = load_exported(folder), AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model(ids).logits[0].float()
        greedy = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    result = run_llama_cpp(python, gguf_path, prompt)
    logits = torch.tensor(result["logits"])
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {"bytes": gguf_path.stat().st_size, "tokens_equal": result["tokens"] == ids[0].tolist(), "max_kl": kl.max().item(),
            "argmax_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
            "greedy_equal": result["generated"] == greedy[0, ids.shape[1]:].tolist(),
            "llama_cpp_python": result["version"]}


def with_llama3_rope(folder: Path, work: Path) -> Path:
    """The same pruned SmolLM2 with Llama 3.1's rope scaling in its config (factor 8 over 8,192
    positions): a trained model whose outputs depend on the rope_freqs tensor llama.cpp reads."""
    copy = work / "smollm2-cut-llama3-rope"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": theta, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    (copy / "config.json").write_text(json.dumps(config, indent=2))
    return copy


def with_ffn_width_zero(path: Path, out: Path) -> Path:
    """A copy of a deci f16/f32 file whose zero-filled FFNs (those `surgery gguf` writes for removed
    ones) are written as llama.cpp's converter would: feed_forward_length 0 and no FFN tensors."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    widths = list(reader.get_field("deci.feed_forward_length").contents())
    zero = [i for i in range(len(widths)) if not np.asarray(tensors[f"blk.{i}.ffn_down.weight"].data).any()]
    writer = gguf.GGUFWriter(str(out), "deci")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = [0 if i in zero else w for i, w in enumerate(widths)] if field.name == "deci.feed_forward_length" else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    for name, tensor in tensors.items():
        if not any(name.startswith(f"blk.{i}.ffn_") for i in zero):
            writer.add_tensor(name, np.array(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def sublayer_rows(python: str, work: Path) -> dict:
    """The sublayer cut in both checkpoint layouts, as deci GGUF files in llama.cpp, and the width-0 control."""
    from surgery.commands import cut_and_export
    from surgery.export.gguf_write import export_gguf
    from surgery.settings import ExportSettings, LoadSettings

    rows: dict = {"removed": SUBLAYERS}
    for layout in ("hf", "nemotron-nas"):
        folder = work / f"smollm2-sublayers-{layout}"
        cut_and_export("smollm2-135m", SUBLAYERS, folder, LoadSettings(device="cpu"), export=ExportSettings(format=layout))
        rows[layout] = {}
        for dtype in ("f16", "q8_0"):
            written = export_gguf(folder, work / f"sublayers-{layout}-{dtype}.gguf", dtype=dtype)
            rows[layout][dtype] = {**compare(python, folder, written.path, PROMPT), "architecture": written.architecture,
                                   "verify_max_kl": written.max_kl}
            print("sublayers", layout, dtype, rows[layout][dtype], flush=True)
    control = with_ffn_width_zero(work / "sublayers-hf-f16.gguf", work / "sublayers-ffn-width-0.gguf")
    rows["control_ffn_width_0"] = compare(python, work / "smollm2-sublayers-hf", control, PROMPT)
    print("sublayers, FFN width 0 (control)", rows["control_ffn_width_0"], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-python", default=sys.executable, help="a Python with llama-cpp-python installed")
    args = parser.parse_args()
    setup(2)
    from surgery.commands import cut_and_export
    from surgery.export.gguf_write import export_gguf
    from surgery.settings import LoadSettings

    work = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    folder = work / "smollm2-cut"
    cut_and_export("smollm2-135m", REMOVE, folder, LoadSettings(device="cpu"))
    rows = {}
    for dtype in ("f16", "q8_0"):
        written = export_gguf(folder, work / f"smollm2-cut-{dtype}.gguf", dtype=dtype)
        rows[dtype] = compare(args.llama_python, folder, written.path, PROMPT)
        print(dtype, rows[dtype], flush=True)
    scaled = with_llama3_rope(folder, work)
    rope = compare(args.llama_python, scaled, export_gguf(scaled, work / "llama3-rope.gguf", dtype="f32").path, PROMPT)
    # Negative control: the same file without rope_freqs, which transformers' reader cannot notice.
    import surgery.export.gguf as writer

    factors, writer.rope_factors = writer.rope_factors, lambda config: None
    try:
        control = compare(args.llama_python, scaled, export_gguf(scaled, work / "no-freqs.gguf", dtype="f32").path, PROMPT)
    finally:
        writer.rope_factors = factors
    print("llama3 rope", {k: v for k, v in rope.items()}, "without rope_freqs", control["max_kl"], flush=True)
    sublayers = sublayer_rows(args.llama_python, work)
    shutil.rmtree(work, ignore_errors=True)
    save("gguf_llamacpp", {"removed": REMOVE, "prompt": PROMPT, "new_tokens": NEW_TOKENS, "formats": rows,
                           "llama3_rope": {**rope, "control_without_rope_freqs": control}, "sublayers": sublayers,
                           "protocol": protocol()})


if __name__ == "__main__":
    main()
