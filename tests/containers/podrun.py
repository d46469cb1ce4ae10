"""Run the pods a chart renders as Docker containers: a small kubelet for the container tests.

The tests render the charts with the pinned helm and hand the objects here, so what runs is what
the chart says (image, command and args, env, user, read-only root, volumes, resources, probes,
preStop) and nothing is written by hand beside it. Kubernetes behaviour that matters to the
images is reproduced:

- a pod is a network namespace (a "pause" container on one internal Docker network, no route out)
  that its init containers, run one after another to completion, and its containers join;
  Services are DNS aliases of the pods they select (`name`, `name.ns`, `name.ns.svc.cluster.local`);
- command/args follow Kubernetes (command replaces ENTRYPOINT, args replace CMD; `$(VAR)` expands);
- env: value, secretKeyRef / configMapKeyRef (a missing key fails the container as the kubelet's
  CreateContainerConfigError does), fieldRef (metadata.name/namespace, status.podIP); envFrom;
- securityContext: runAsUser/Group, runAsNonRoot (refused for an image that runs as root with no
  uid given), fsGroup and supplementalGroups, readOnlyRootFilesystem, allowPrivilegeEscalation,
  capabilities, seccomp (RuntimeDefault = Docker's default profile);
- volumes: emptyDir (a fresh folder per pod, 0777 like the kubelet's; medium Memory on /dev/shm),
  configMap and secret (files per key, read-only), hostPath; volumeMounts with subPath/readOnly;
- resources: limits.cpu -> --cpus, limits.memory -> --memory (no swap), requests -> cpu shares and
  memory reservation; a limit above this machine's CPUs is an error, not silently clamped;
- probes (httpGet, tcpSocket, exec) from inside the pod's network namespace, as the kubelet probes
  the pod IP; preStop exec hooks and terminationGracePeriodSeconds on delete.

What it does not do (the tests do not rely on it): NetworkPolicy, Service port remapping (a
Service whose port differs from its target port is an error here), ephemeral-storage and emptyDir
sizeLimit accounting, liveness restarts, a Job controller's retries (a test re-runs a pod itself),
image pulls (images must be present).
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


class PodError(RuntimeError):
    """A pod could not be created or run as its spec says (what the kubelet would report)."""


def quantity(value: Any) -> float:
    """A Kubernetes quantity ("500m", "2", "8Gi", "512Mi", "1G") as a plain number (bytes or cores)."""
    text = str(value)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", text)
    if not match or (match.group(2) and match.group(2) not in units):
        raise PodError(f"not a quantity: {value!r}")
    return float(match.group(1)) * units.get(match.group(2), 1)


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values ($$ escapes)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def socket_in_netns(pid: int) -> socket.socket:
    """A TCP socket that lives in the network namespace of process `pid` (made on a thread that
    joined that namespace; the socket stays there whichever thread then uses it)."""
    made: dict[str, Any] = {}

    def work() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into the network namespace of pid {pid}")
            finally:
                os.close(fd)
            made["sock"] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except BaseException as exc:  # handed to the caller's thread
            made["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if "error" in made:
        raise made["error"]
    return made["sock"]


@dataclass
class Pod:
    name: str
    namespace: str
    labels: dict[str, str]
    spec: dict[str, Any]
    pause: str  # container id of the network namespace holder
    hostname: str  # what the pod's name resolves as on the cluster network
    ip: str
    pid: int
    dir: Path
    containers: dict[str, str] = field(default_factory=dict)  # name -> container id
    init_exit: dict[str, int] = field(default_factory=dict)


class PortForward:
    """`kubectl port-forward`: a loopback port on this host that reaches a port inside a pod's
    network namespace (the pod's own 127.0.0.1), relayed in this process."""

    def __init__(self, pid: int, port: int):
        self.pid, self.port = pid, port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.local_port = self.server.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket_in_netns(self.pid)
                upstream.connect(("127.0.0.1", self.port))
            except OSError:
                client.close()
                continue
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
                try:
                    s.shutdown(how)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.server.close()


class Cluster:
    """One test's "cluster": an internal Docker network, the objects applied to it, and its pods."""

    def __init__(self, engine: list[str], workdir: Path, *, pause_image: str, images: dict[str, str] | None = None,
                 cpus: float | None = None):
        self.engine = engine
        self.workdir = workdir
        self.pause_image = pause_image
        self.images = images or {}  # image reference -> local stand-in (a registry mirror)
        self.cpus = cpus or float(os.cpu_count() or 1)
        self.id = uuid.uuid4().hex[:8]
        self.network = f"lawtune-test-{self.id}"
        self.objects: dict[tuple[str, str, str], dict] = {}  # (kind, namespace, name) -> object
        self.pods: dict[str, Pod] = {}
        self.forwards: list[PortForward] = []
        self.shm_dirs: list[Path] = []
        self.docker("network", "create", "--internal", "--label", "io.lawtune.test=1", self.network)

    # ---- engine ----

    def docker(self, *args: str, check: bool = True, timeout: float | None = 600, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.engine, *args], capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise PodError(f"{' '.join(self.engine)} {' '.join(args[:3])}... failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return proc

    # ---- objects ----

    def apply(self, objects: list[dict], namespace: str = "default") -> None:
        """Store ConfigMaps, Secrets and Services (what pods refer to); other kinds are kept for lookup."""
        for obj in objects:
            if not obj:
                continue
            meta = obj.setdefault("metadata", {})
            meta.setdefault("namespace", namespace)
            if obj["kind"] == "Secret" and "stringData" in obj:
                obj = {**obj, "data": {**obj.get("data", {}), **obj["stringData"]}, "_plain": True}
            self.objects[(obj["kind"], meta["namespace"], meta["name"])] = obj

    def secret(self, name: str, namespace: str, data: dict[str, str]) -> None:
        """`kubectl create secret generic` (values in plain text)."""
        self.apply([{"kind": "Secret", "metadata": {"name": name, "namespace": namespace}, "data": data, "_plain": True}])

    def get(self, kind: str, name: str, namespace: str) -> dict:
        try:
            return self.objects[(kind, namespace, name)]
        except KeyError:
            raise PodError(f"{kind} {namespace}/{name} does not exist") from None

    def _secret_data(self, name: str, namespace: str) -> dict[str, str]:
        obj = self.get("Secret", name, namespace)
        if obj.get("_plain"):
            return dict(obj.get("data", {}))
        import base64

        return {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}

    def _configmap_data(self, name: str, namespace: str) -> dict[str, str]:
        return dict(self.get("ConfigMap", name, namespace).get("data", {}))

    def _aliases(self, namespace: str, labels: dict[str, str]) -> list[str]:
        aliases = []
        for (kind, ns, name), svc in self.objects.items():
            if kind != "Service" or ns != namespace:
                continue
            selector = svc.get("spec", {}).get("selector") or {}
            if not selector or any(labels.get(k) != v for k, v in selector.items()):
                continue
            for port in svc["spec"].get("ports", []):
                target = port.get("targetPort", port["port"])
                if isinstance(target, int) and target != port["port"]:
                    raise PodError(f"Service {ns}/{name}: port {port['port']} -> targetPort {target} cannot be "
                                   "remapped here (a DNS alias reaches the pod's own port)")
            aliases += [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]
        return aliases

    # ---- pods ----

    def create_pod(self, template: dict, name: str, namespace: str = "default") -> Pod:
        """Run a pod template: its network namespace, its init containers in order (each must exit 0),
        then its containers (started, not waited for). Raises PodError on an init failure."""
        meta, spec = template.get("metadata", {}), template["spec"]
        labels = dict(meta.get("labels", {}))
        pod_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir))
        security = spec.get("securityContext", {})
        pause = self.docker(
            "run", "-d", "--name", f"{name}-{self.id}", "--hostname", name[:63], "--network", self.network,
            *[a for alias in self._aliases(namespace, labels) for a in ("--network-alias", alias)],
            "--label", "io.lawtune.test=1", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--user", f"{security.get('runAsUser', 65535)}:{security.get('runAsGroup', 65535)}",
            "--entrypoint", "sleep", self.pause_image, "infinity",
        ).stdout.strip()
        info = json.loads(self.docker("inspect", pause).stdout)[0]
        pod = Pod(name, namespace, labels, spec, pause, f"{name}-{self.id}",
                  info["NetworkSettings"]["Networks"][self.network]["IPAddress"], info["State"]["Pid"], pod_dir)
        self.pods[name] = pod
        volumes = self._volumes(pod)
        for container in spec.get("initContainers", []):
            cid = self._run_container(pod, container, volumes, detach=False)
            code = int(self.docker("inspect", "--format", "{{.State.ExitCode}}", cid).stdout)
            pod.init_exit[container["name"]] = code
            if code != 0:
                raise PodError(f"pod {name}: init container {container['name']} exited {code}:\n{self.logs(cid)[-3000:]}")
        for container in spec["containers"]:
            pod.containers[container["name"]] = self._run_container(pod, container, volumes, detach=True)
        return pod

    def _volumes(self, pod: Pod) -> dict[str, tuple[Path, bool]]:
        """name -> (host folder, read-only)."""
        out = {}
        fs_group = pod.spec.get("securityContext", {}).get("fsGroup")
        for volume in pod.spec.get("volumes", []):
            name = volume["name"]
            if "emptyDir" in volume:
                if volume["emptyDir"].get("medium") == "Memory":
                    path = Path(tempfile.mkdtemp(prefix=f"lawtune-{pod.name}-{name}-", dir="/dev/shm"))
                    self.shm_dirs.append(path)
                else:
                    path = pod.dir / "volumes" / name
                    path.mkdir(parents=True)
                path.chmod(0o777)
                if fs_group is not None:
                    os.chown(path, 0, int(fs_group))
                    path.chmod(0o2777)
                out[name] = (path, False)
            elif "configMap" in volume or "secret" in volume:
                source = volume.get("configMap") or volume["secret"]
                data = (self._configmap_data(source["name"], pod.namespace) if "configMap" in volume
                        else self._secret_data(source["secretName"], pod.namespace))
                path = pod.dir / "volumes" / name
                path.mkdir(parents=True)
                items = source.get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    if item["key"] not in data:
                        raise PodError(f"pod {pod.name}: volume {name}: key {item['key']!r} is not in its source")
                    target = path / item["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(data[item["key"]])
                    target.chmod(int(item.get("mode", source.get("defaultMode", 0o644))))
                path.chmod(0o755)
                out[name] = (path, True)
            elif "hostPath" in volume:
                out[name] = (Path(volume["hostPath"]["path"]), False)
            else:
                raise PodError(f"pod {pod.name}: volume {name}: only emptyDir, configMap, secret and hostPath run here")
        return out

    def _env(self, pod: Pod, container: dict) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                data = self._secret_data(source["secretRef"]["name"], pod.namespace)
            else:
                data = self._configmap_data(source["configMapRef"]["name"], pod.namespace)
            env.update({prefix + k: v for k, v in data.items()})
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = expand(str(var["value"]), env)
                continue
            ref = var.get("valueFrom", {})
            try:
                if "secretKeyRef" in ref:
                    key = ref["secretKeyRef"]
                    env[var["name"]] = self._secret_data(key["name"], pod.namespace)[key["key"]]
                elif "configMapKeyRef" in ref:
                    key = ref["configMapKeyRef"]
                    env[var["name"]] = self._configmap_data(key["name"], pod.namespace)[key["key"]]
                elif "fieldRef" in ref:
                    path = ref["fieldRef"]["fieldPath"]
                    fields = {"metadata.name": pod.name, "metadata.namespace": pod.namespace, "status.podIP": pod.ip,
                              "spec.nodeName": socket.gethostname()}
                    env[var["name"]] = fields[path]
                elif var.get("valueFrom") is None:
                    env[var["name"]] = ""
                else:
                    raise PodError(f"env {var['name']}: {sorted(ref)} is not supported here")
            except (KeyError, PodError) as exc:
                optional = next(iter(ref.values()), {}).get("optional", False)
                if not optional:
                    raise PodError(f"pod {pod.name}: CreateContainerConfigError: env {var['name']}: {exc}") from None
        return env

    def _security(self, pod: Pod, container: dict, image: str) -> list[str]:
        pod_sc, sc = pod.spec.get("securityContext", {}), container.get("securityContext", {})
        merged = {**pod_sc, **sc}
        args = []
        user, group = merged.get("runAsUser"), merged.get("runAsGroup")
        if merged.get("runAsNonRoot"):
            effective = user
            if effective is None:
                configured = self.docker("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
                effective = configured.split(":")[0] or "0"
                if not effective.isdigit():
                    raise PodError(f"container {container['name']}: runAsNonRoot with a non-numeric image user {configured!r}")
            if int(effective) == 0:
                raise PodError(f"container {container['name']}: CreateContainerConfigError: container has runAsNonRoot "
                               "and image will run as root")
        if user is not None:
            args += ["--user", f"{user}:{group if group is not None else 0}"]
        for gid in [pod_sc.get("fsGroup"), *pod_sc.get("supplementalGroups", [])]:
            if gid is not None:
                args += ["--group-add", str(gid)]
        if sc.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        if sc.get("privileged"):
            args.append("--privileged")
        caps = sc.get("capabilities", {})
        args += [a for cap in caps.get("drop", []) for a in ("--cap-drop", cap)]
        args += [a for cap in caps.get("add", []) for a in ("--cap-add", cap)]
        seccomp = merged.get("seccompProfile", {}).get("type", "RuntimeDefault")
        if seccomp == "Unconfined":
            args += ["--security-opt", "seccomp=unconfined"]
        elif seccomp != "RuntimeDefault":
            raise PodError(f"container {container['name']}: seccompProfile {seccomp} is not supported here")
        return args

    def _resources(self, container: dict) -> list[str]:
        resources = container.get("resources", {})
        limits, requests = resources.get("limits", {}), resources.get("requests", {})
        args = []
        for key in limits:
            if key not in ("cpu", "memory", "ephemeral-storage"):
                raise PodError(f"container {container['name']}: resource {key} is not available on this machine")
        if "cpu" in limits:
            cpus = quantity(limits["cpu"])
            if cpus > self.cpus:
                raise PodError(f"container {container['name']}: limits.cpu {limits['cpu']} is more than this "
                               f"machine's {self.cpus:g} CPUs (the pod would not schedule on such a node)")
            args += ["--cpus", f"{cpus:g}"]
        if "memory" in limits:
            memory = int(quantity(limits["memory"]))
            args += ["--memory", str(memory), "--memory-swap", str(memory)]
        if "memory" in requests:
            args += ["--memory-reservation", str(int(quantity(requests["memory"])))]
        if "cpu" in requests:
            args += ["--cpu-shares", str(max(2, int(quantity(requests["cpu"]) * 1024)))]
        return args

    def _run_container(self, pod: Pod, container: dict, volumes: dict[str, tuple[Path, bool]], *, detach: bool) -> str:
        image = self.images.get(container["image"], container["image"])
        if self.docker("image", "inspect", image, check=False).returncode != 0:
            raise PodError(f"pod {pod.name}: container {container['name']}: ErrImageNeverPull: image {image} is not present")
        env = self._env(pod, container)
        env_file = pod.dir / f"{container['name']}.env"
        env_file.touch(mode=0o600)
        for key, value in env.items():
            if "\n" in value:
                raise PodError(f"env {key} holds a newline, which an env file cannot carry")
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        mounts = []
        for mount in container.get("volumeMounts", []):
            if mount["name"] not in volumes:
                raise PodError(f"container {container['name']}: volumeMount {mount['name']} names no volume")
            source, read_only = volumes[mount["name"]]
            if mount.get("subPath"):
                source = source / mount["subPath"]
            spec = f"type=bind,src={source},dst={mount['mountPath']}"
            if read_only or mount.get("readOnly"):
                spec += ",readonly"
            mounts += ["--mount", spec]
        command = [expand(str(a), env) for a in container.get("command", [])]
        args = [expand(str(a), env) for a in container.get("args", [])]
        argv = ["run", "--name", f"{pod.name}-{container['name']}-{self.id}", "--network", f"container:{pod.pause}",
                "--label", "io.lawtune.test=1", "--env-file", str(env_file), *mounts, *self._security(pod, container, image),
                *self._resources(container)]
        if container.get("workingDir"):
            argv += ["-w", container["workingDir"]]
        if command:
            argv += ["--entrypoint", command[0]]
        argv += ["-d", image, *command[1:], *args]
        cid = self.docker(*argv).stdout.strip()
        if not detach:
            self.docker("wait", cid, timeout=None)
        return cid

    # ---- using pods ----

    def wait(self, pod: Pod, container: str | None = None, timeout: float | None = None) -> int:
        """Wait for a container (the first by default) to exit; its exit code."""
        cid = pod.containers[container or next(iter(pod.containers))]
        out = self.docker("wait", cid, timeout=timeout).stdout.strip()
        return int(out)

    def logs(self, cid: str) -> str:
        proc = self.docker("logs", cid, check=False)
        return proc.stdout + proc.stderr

    def pod_logs(self, pod: Pod, container: str | None = None) -> str:
        return self.logs(pod.containers[container or next(iter(pod.containers))])

    def running(self, pod: Pod, container: str | None = None) -> bool:
        cid = pod.containers[container or next(iter(pod.containers))]
        return self.docker("inspect", "--format", "{{.State.Running}}", cid).stdout.strip() == "true"

    def kill(self, pod: Pod, container: str | None = None, signal: str = "KILL") -> None:
        self.docker("kill", "--signal", signal, pod.containers[container or next(iter(pod.containers))])

    def probe(self, pod: Pod, probe: dict, container: dict) -> bool:
        try:
            if "httpGet" in probe:
                get = probe["httpGet"]
                sock = socket_in_netns(pod.pid)
                sock.settimeout(float(probe.get("timeoutSeconds", 1)))
                sock.connect(("127.0.0.1", self._port(get["port"], container)))
                conn = http.client.HTTPConnection("127.0.0.1", timeout=float(probe.get("timeoutSeconds", 1)))
                conn.sock = sock
                conn.request("GET", get.get("path", "/"))
                status = conn.getresponse().status
                conn.close()
                return 200 <= status < 400
            if "tcpSocket" in probe:
                sock = socket_in_netns(pod.pid)
                sock.settimeout(float(probe.get("timeoutSeconds", 1)))
                sock.connect(("127.0.0.1", self._port(probe["tcpSocket"]["port"], container)))
                sock.close()
                return True
            if "exec" in probe:
                cid = pod.containers[container["name"]]
                return self.docker("exec", cid, *probe["exec"]["command"], check=False,
                                   timeout=float(probe.get("timeoutSeconds", 1)) + 5).returncode == 0
        except (OSError, http.client.HTTPException, subprocess.TimeoutExpired):
            return False
        raise PodError(f"probe {sorted(probe)} is not supported here")

    @staticmethod
    def _port(port: int | str, container: dict) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in container.get("ports", []):
            if p.get("name") == port:
                return int(p["containerPort"])
        raise PodError(f"container {container['name']} has no port named {port!r}")

    def wait_ready(self, pod: Pod, timeout: float) -> None:
        """The kubelet's startup then readiness probes, for every container; PodError with the logs
        when a container exits or the probes do not pass within `timeout`."""
        deadline = time.monotonic() + timeout
        for container in pod.spec["containers"]:
            for kind in ("startupProbe", "readinessProbe"):
                probe = container.get(kind)
                if not probe:
                    continue
                while not self.probe(pod, probe, container):
                    if not self.running(pod, container["name"]):
                        raise PodError(f"pod {pod.name}: container {container['name']} exited before it was ready:\n"
                                       f"{self.pod_logs(pod, container['name'])[-5000:]}")
                    if time.monotonic() > deadline:
                        raise PodError(f"pod {pod.name}: container {container['name']} not ready after {timeout:.0f} s "
                                       f"({kind}):\n{self.pod_logs(pod, container['name'])[-5000:]}")
                    time.sleep(float(probe.get("periodSeconds", 10)) if kind == "readinessProbe" else 1.0)

    def port_forward(self, pod: Pod, port: int) -> int:
        forward = PortForward(pod.pid, port)
        self.forwards.append(forward)
        return forward.local_port

    def delete_pod(self, pod: Pod) -> None:
        """preStop hooks, then SIGTERM with the pod's grace period, then the network namespace."""
        grace = int(pod.spec.get("terminationGracePeriodSeconds", 30))
        for container in pod.spec["containers"]:
            cid = pod.containers.get(container["name"])
            if not cid:
                continue
            hook = container.get("lifecycle", {}).get("preStop", {}).get("exec")
            if hook and self.running(pod, container["name"]):
                self.docker("exec", cid, *hook["command"], check=False, timeout=grace)
            self.docker("stop", "-t", str(grace), cid, check=False, timeout=grace + 30)
        self._remove(pod)

    def _remove(self, pod: Pod) -> None:
        ids = [*pod.containers.values(), pod.pause]
        self.docker("rm", "-f", *ids, check=False)
        shutil.rmtree(pod.dir, ignore_errors=True)
        self.pods.pop(pod.name, None)

    def close(self) -> None:
        for forward in self.forwards:
            forward.close()
        stale = self.docker("ps", "-aq", "--filter", f"name={self.id}", check=False).stdout.split()
        if stale:
            self.docker("rm", "-f", *stale, check=False)
        for pod in list(self.pods.values()):
            shutil.rmtree(pod.dir, ignore_errors=True)
        for path in self.shm_dirs:
            shutil.rmtree(path, ignore_errors=True)
        self.docker("network", "rm", self.network, check=False)


def pod_template(obj: dict) -> dict:
    """The pod template of a Job or Deployment (or a bare Pod's own spec)."""
    if obj["kind"] == "Pod":
        return {"metadata": obj.get("metadata", {}), "spec": obj["spec"]}
    return obj["spec"]["template"]
