"""The model card (README.md) of a pruned checkpoint, with Hugging Face Hub metadata."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from surgery.heal import method, method_line
from surgery.report import stage_table
from surgery.source import BUILTIN_MODELS

_BUILTIN_LICENCES = {"smollm2-135m": {"license": "apache-2.0"}}  # as the built-in models' own cards say


def source_card_metadata(source: dict[str, Any], folder: Path | None = None) -> dict[str, Any]:
    """base_model and license of the source: from its own card (in its local `folder`), a Hub id,
    or the built-in table."""
    if source.get("spec") in BUILTIN_MODELS:
        return {"base_model": BUILTIN_MODELS[source["spec"]][3], **_BUILTIN_LICENCES[source["spec"]]}
    found: dict[str, Any] = {}
    if source.get("kind") == "hub":
        found["base_model"] = source["spec"].split("@")[0]
    readme = Path(folder) / "README.md" if folder else None
    if readme is not None and readme.is_file():
        match = re.match(r"^---\n(.*?)\n---", readme.read_text(errors="replace"), re.S)
        if match:
            try:
                meta = yaml.safe_load(match.group(1)) or {}
            except yaml.YAMLError:
                meta = {}
            if meta.get("license"):
                found["license"] = meta["license"]
            if "base_model" not in found and isinstance(meta.get("base_model"), str):
                found.setdefault("base_model", meta["base_model"])
    return found


def model_card(report: dict[str, Any], repo_id: str | None = None, source_folder: Path | None = None) -> str:
    """README.md text: YAML metadata for the Hub, then what was done and how it scores. `report` is
    the published one (no local paths); `source_folder` is where the source's own card may be."""
    source = report["source"]
    meta = source_card_metadata(source, source_folder)
    plan = report["plan"]
    healing = report.get("healing")
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "license": meta.get("license", "other"),
        "tags": ["pruned", "layer-pruning", "surgery"] + ([f"{method(healing['settings'], short=True).lower()}-healed"]
                                                           if healing else []),
    }
    if meta.get("base_model"):
        metadata["base_model"] = meta["base_model"]
    datasets = re.findall(r"hf://([\w.-]+/[\w.-]+)", healing["data_source"]) if healing else []
    if datasets:
        metadata["datasets"] = sorted(set(datasets))
    sublayer_checkpoint = any(not _is_block(plan, unit) for unit in plan["removed"])
    name = repo_id or Path(report.get("settings", {}).get("out") or f"{source['spec']}-pruned").name
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    lines += [
        f"A pruned version of `{meta.get('base_model', source['spec'])}` made with "
        f"surgery: {len(plan['removed'])} sublayers removed physically "
        f"({plan['removed_compact']}), {100 * plan['fraction_of_decoder_parameters']:.1f}% of the decoder parameters, "
        f"chosen by the `{plan['strategy']}` strategy at {plan['granularity']} granularity"
        + (f", then healed by {method(healing['settings'])} on {healing['data_source']}" if healing else "")
        + ".", "",
        "## How to load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained(\"{name}\"" + (", trust_remote_code=True" if sublayer_checkpoint else "") + ")",
        f"tokenizer = AutoTokenizer.from_pretrained(\"{name}\")", "```", "",
    ]
    if sublayer_checkpoint:
        lines += ["Some blocks lost only their attention or only their FFN. The checkpoint ships `modeling_surgery.py`, "
                  "which rebuilds those blocks with parameter-free stand-ins, hence `trust_remote_code=True`; "
                  "plain loading refuses the checkpoint rather than filling the removed parts with random weights.", ""]
    lines += ["## What was removed and why", "", f"- target: {plan['target']}; strategy: `{plan['strategy']}`; granularity: {plan['granularity']}",
              f"- removed: `{plan['removed_compact']}`"]
    if plan.get("protected"):
        lines.append(f"- protected (cornerstones and manual): `{', '.join(plan['protected'])}`")
    for note in plan.get("notes", []):
        lines.append(f"- {note}")
    if healing:
        settings = healing["settings"]
        lines += ["", "## Healing", "",
                  f"- {method_line(settings)}",
                  f"- {settings['steps']} steps of {settings['batch_size']} x {settings['seq_len']} tokens "
                  f"(x{settings['grad_accum']} accumulation), {settings['training_tokens']:,} tokens from {healing['data_source']}",
                  f"- held-out loss: {healing['loss_before']:.4f} before, {healing['loss_after']:.4f} after"]
    table = stage_table(report) if report.get("evaluations") else []
    if table:
        lines += ["", "## Evaluation", "", "Zero-shot accuracy through lm-eval with the chance level beside it; perplexity by "
                  "surgery's documented protocol. Small models sit near chance on several tasks: compare against the chance column.", ""]
        lines += table
    lines += ["", "## Reproduce", "", "`surgery.json` records the source fingerprint, versions and the exact removal; "
              "`report.json` every number above with its protocol.", ""]
    return "\n".join(lines)


def _is_block(plan: dict[str, Any], unit: str) -> bool:
    layer, _, kind = unit.partition(".")
    other = f"{layer}.{'mlp' if kind == 'attn' else 'attn'}"
    return other in plan["removed"]
