"""The serving contract: what a published model version must be served with, so that serving
answers as evaluation scored.

Publish writes it into the version's manifest (``extra.serving``) and its engine settings into
the version as ``lawtune-vllm.yaml`` (a vLLM ``--config`` file: the evaluated dtype and decoding
defaults); ``jobs.fetch_model`` checks the fetched folder against it; ``make serve``, the parity
check and the serving chart pass ``--config``, ``--chat-template`` and ``--generation-config``
(its eos ids are the stop tokens) to vLLM explicitly (``vllm_args``), so vLLM never guesses. It holds:

- ``chat_template``: the file and the sha256 of the template text evaluate rendered prompts with;
- ``tokenizer_files``: sha256 of each tokenizer file of the version;
- ``special_tokens`` (bos/eos/pad/unk as text) and ``eos_token_ids``: the ids that end an answer
  (generation_config.json's ``eos_token_id`` and the tokenizer's eos), ``stop_tokens`` as text;
- ``generation``: evaluate's decoding settings (greedy, repetition_penalty...), which serving
  takes as its defaults, and ``max_new_tokens``; ``max_input_length`` and ``max_model_len``;
- ``dtype`` and ``engine``: what evaluate generated with (the parity check serves in that dtype).

Everything here reads plain files (JSON, the template text): no model code runs, so fetch-model
verifies a version without transformers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from shared.store.paths import unsafe_relative_path

SCHEMA = "lawtune.serving/v1"
CHAT_TEMPLATE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
# Files a Hugging Face tokenizer may read; whichever of them a folder has are its tokenizer files.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model", CHAT_TEMPLATE,
                   "chat_template.json")
_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")


class ContractError(ValueError):
    """A model folder does not match its serving contract; the message names the file and what differs."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError as exc:
        raise ContractError(f"{path.name}: not valid JSON ({exc})") from None


def chat_template_text(folder: Path) -> tuple[str, str] | None:
    """(the file it lives in, the template text) of a model folder, or None when it has none."""
    if (folder / CHAT_TEMPLATE).is_file():
        return CHAT_TEMPLATE, (folder / CHAT_TEMPLATE).read_text(encoding="utf-8")
    template = _json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, str):
        return "tokenizer_config.json", template
    return None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<|im_end|>", "lstrip": false, ...}
        return value.get("content")
    return value if isinstance(value, str) else None


def special_tokens(folder: Path) -> dict[str, str | None]:
    config = {**_json(folder / "special_tokens_map.json"), **_json(folder / "tokenizer_config.json")}
    return {name.removesuffix("_token"): _token_text(config.get(name)) for name in _SPECIAL}


def eos_token_ids(folder: Path) -> list[int]:
    """The ids generation stops on: generation_config.json's eos_token_id (one id or a list)."""
    value = _json(folder / GENERATION_CONFIG).get("eos_token_id")
    ids = value if isinstance(value, list) else [value] if value is not None else []
    return sorted({int(i) for i in ids})


def describe(folder: Path) -> dict[str, Any]:
    """What a model folder would be served with: template, tokenizer files, special tokens, stop ids."""
    found = chat_template_text(folder)
    return {
        "chat_template": {"file": found[0], "sha256": _sha256(found[1].encode("utf-8"))} if found else None,
        "tokenizer_files": {name: _sha256((folder / name).read_bytes()) for name in TOKENIZER_FILES if (folder / name).is_file()},
        "special_tokens": special_tokens(folder),
        "eos_token_ids": eos_token_ids(folder),
    }


def build(folder: Path, evaluated: dict[str, Any]) -> dict[str, Any]:
    """The contract of a published folder, from its files and what evaluate generated with
    (``evaluated``: metrics.json's ``serving`` block: generation, dtype, engine, lengths, stop tokens)."""
    described = describe(folder)
    generation = dict(evaluated.get("generation") or {})
    max_new = int(generation.get("max_new_tokens") or 0)
    max_input = int(evaluated.get("max_input_length") or 0)
    return {
        "schema": SCHEMA,
        **described,
        "stop_tokens": evaluated.get("stop_tokens") or [t for t in [described["special_tokens"]["eos"]] if t],
        "generation": generation,
        "max_input_length": max_input,
        "max_new_tokens": max_new,
        "max_model_len": max_input + max_new if max_input and max_new else None,
        "dtype": evaluated.get("dtype"),
        "engine": evaluated.get("engine"),
    }


def verify(folder: Path, contract: dict[str, Any]) -> None:
    """Raise ContractError naming the first file that does not match ``contract``; checks plain files only."""
    if not isinstance(contract, dict) or contract.get("schema") != SCHEMA:
        raise ContractError(f"the manifest's serving contract is missing or not {SCHEMA}")
    template = contract.get("chat_template")
    found = chat_template_text(folder)
    if template:
        if found is None:
            raise ContractError(f"chat template: the contract names {template['file']} but the folder has no chat template")
        if _sha256(found[1].encode("utf-8")) != template["sha256"]:
            raise ContractError(f"chat template: {found[0]} (sha256 {_sha256(found[1].encode())[:12]}…) is not the template "
                                f"the version was evaluated with (sha256 {template['sha256'][:12]}…)")
    for name, digest in (contract.get("tokenizer_files") or {}).items():
        if reason := unsafe_relative_path(str(name)):  # names read from the store never reach outside the folder
            raise ContractError(f"tokenizer file {name!r} {reason}; refused")
        path = folder / name
        if not path.is_file():
            raise ContractError(f"tokenizer file {name}: missing from the folder")
        if _sha256(path.read_bytes()) != digest:
            raise ContractError(f"tokenizer file {name}: sha256 {_sha256(path.read_bytes())[:12]}… differs from the contract's "
                                f"{digest[:12]}… (a swapped tokenizer file)")
    _verify_vllm_config(folder, contract)
    expected = set(contract.get("eos_token_ids") or [])
    have = set(eos_token_ids(folder))
    if expected - have:
        missing = ", ".join(str(i) for i in sorted(expected - have))
        found = f"eos_token_id {sorted(have)} lacks" if have else "eos_token_id is missing; it must hold"
        raise ContractError(f"{GENERATION_CONFIG}: {found} {missing} ({', '.join(contract.get('stop_tokens') or [])}): "
                            "served answers would not stop where evaluated ones did")


def _verify_vllm_config(folder: Path, contract: dict[str, Any]) -> None:
    import yaml

    path = folder / VLLM_CONFIG
    if not path.is_file():
        raise ContractError(f"{VLLM_CONFIG}: missing; serving would not get the evaluated dtype and decoding defaults")
    try:
        found = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ContractError(f"{VLLM_CONFIG}: not valid YAML ({exc})") from None
    if found != vllm_config(contract):
        raise ContractError(f"{VLLM_CONFIG}: {found} is not the contract's engine settings {vllm_config(contract)}")


def vllm_args(folder: Path, contract: dict[str, Any]) -> list[str]:
    """vLLM server flags that make serving use the contract: ``--config`` (the version's lawtune-vllm.yaml:
    the evaluated dtype, and evaluate's decoding as the defaults a request that sets nothing gets),
    ``--chat-template`` (the verified file) and ``--generation-config`` (the folder: its
    generation_config.json carries the stop ids). The serving chart passes the same three."""
    args = ["--config", str(folder / VLLM_CONFIG)]
    template = contract.get("chat_template")
    if template:
        args += ["--chat-template", str(folder / template["file"]) if template["file"] == CHAT_TEMPLATE
                 else str(_template_file(folder))]
    return [*args, "--generation-config", str(folder)]


def write_vllm_config(folder: Path, contract: dict[str, Any]) -> None:
    """Publish writes the contract's engine settings beside the model (it is then in the manifest, checksummed)."""
    import yaml

    (folder / VLLM_CONFIG).write_text(yaml.safe_dump(vllm_config(contract), sort_keys=True), encoding="utf-8")


VLLM_CONFIG = "lawtune-vllm.yaml"


def vllm_config(contract: dict[str, Any] | None) -> dict[str, Any]:
    """The contract's engine settings as a vLLM ``--config`` file's content (dtype, decoding defaults)."""
    if not contract:
        return {}
    out: dict[str, Any] = {}
    if contract.get("dtype"):
        out["dtype"] = contract["dtype"]
    defaults = serving_defaults(contract)
    if defaults:
        out["override-generation-config"] = defaults
    return out


def serving_defaults(contract: dict[str, Any]) -> dict[str, Any]:
    """Evaluate's decoding settings as vLLM's default sampling parameters."""
    gen = contract.get("generation") or {}
    if not gen:
        return {}
    out = {"repetition_penalty": gen.get("repetition_penalty", 1.0)}
    if gen.get("do_sample"):
        out.update(temperature=gen.get("temperature", 1.0), top_p=gen.get("top_p", 1.0))
    else:
        out.update(temperature=0.0)
    return out


def _template_file(folder: Path) -> Path:
    """A template that lives inside tokenizer_config.json, written beside it for vLLM's --chat-template."""
    found = chat_template_text(folder)
    path = folder / CHAT_TEMPLATE
    if found and not path.exists():
        path.write_text(found[1], encoding="utf-8")
    return path
