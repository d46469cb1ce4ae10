"""Which serving release runs which model version, recorded beside the model in the store.

    models/<name>/releases/<cluster>/<namespace>/<release>.json   what `lawtune deploy` last put in that release

``lawtune deploy`` writes one once ``helm upgrade --install --wait`` returned (``status``
"deployed": the rollout is ready; "failed": helm applied the version but its rollout did not get
ready in time), so ``lawtune lineage`` can end a version's chain at the releases serving it. One
object per release of one cluster, overwritten by the next deploy of that release: it says what
runs now, and the promotion history says how it got there. The cluster is part of the key, so
staging and prod releases of the same namespace and name keep their own records (records
written before carry no cluster: ``releases/<namespace>/<release>.json``). A release deployed
with plain ``helm install`` (not through ``lawtune deploy``) leaves no record; lineage then
says "not recorded".

Lives in ``shared.store`` because the writer (``shared.serve.deploy``) and the reader
(``shared.publish.lineage``) sit on one rank and may not import each other.
"""

from __future__ import annotations

import getpass
import json
import os
import re
from typing import Any

from shared.store.storage import Location

RELEASES = "releases"
DEFAULT_NAMESPACE = "default"
# Kubernetes names: DNS-1123 labels for namespaces, release names as helm allows them
_K8S_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def cluster_key(cluster: str) -> str:
    """A cluster's name as one path segment: an EKS ARN (arn:aws:eks:...:cluster/prod) included."""
    key = re.sub(r"[^A-Za-z0-9._-]+", "-", cluster).strip("-.")
    if not key:
        raise ValueError(f"cluster {cluster!r} has no letters or digits to name it by")
    return key


def actor() -> str:
    """Who acted: ``LAWTUNE_ACTOR`` (a CI job, a person) or the host user."""
    if os.environ.get("LAWTUNE_ACTOR"):
        return os.environ["LAWTUNE_ACTOR"]
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry for the uid, as in many containers
        return f"uid-{os.getuid()}"


def record_release(model_root: Location, *, release: str, namespace: str, version: str, deployed_at: str,
                   cluster: str | None = None, **facts: Any) -> dict[str, Any]:
    """Record that ``cluster``'s ``namespace/release`` now serves ``version`` (overwrites that release's record)."""
    for key, value in (("release", release), ("namespace", namespace)):
        if not _K8S_NAME.match(value):
            raise ValueError(f"{key} {value!r} is not a Kubernetes name")
    record = {"release": release, "namespace": namespace, **({"cluster": cluster} if cluster else {}), "version": version,
              "deployed_at": deployed_at, "actor": actor(), **facts}
    where = f"{cluster_key(cluster)}/{namespace}" if cluster else namespace
    model_root.write_text(f"{RELEASES}/{where}/{release}.json", json.dumps(record, ensure_ascii=False, indent=2) + "\n")
    return record


def release_name(record: dict[str, Any]) -> str:
    """``cluster/namespace/release`` (``namespace/release`` for a record without a cluster)."""
    return "/".join(part for part in (record.get("cluster"), record["namespace"], record["release"]) if part)


def releases(model_root: Location) -> list[dict[str, Any]]:
    """Every recorded release of this model, by cluster, namespace, then release name."""
    folder = model_root.child(RELEASES)
    return [json.loads(folder.read_text(name)) for name in folder.list_files() if name.endswith(".json")]
