#!/usr/bin/env bash
# A container engine for `make images`, `make base-images` and `make test-containers`:
#   - an engine that answers and a CLI that builds with BuildKit are used as they are (your Docker);
#   - else Debian's docker.io (dockerd 20.10, containerd, runc; its client builds with BuildKit)
#     is installed when missing (as root, with apt-get), and dockerd is started when nothing answers;
#   - mmdebstrap is installed too when WANT_MMDEBSTRAP=1 (`make base-images` needs it).
# dockerd's log: $DOCKERD_LOG (default .cache/dockerd.log).
set -euo pipefail

log=${DOCKERD_LOG:-.cache/dockerd.log}

buildkit_cli() {  # the CLI images/build.py will pick, if any answers
  python3 -c 'import importlib.util as u, sys; s = u.spec_from_file_location("b", "images/build.py"); m = u.module_from_spec(s); s.loader.exec_module(m); print(" ".join(m.buildkit_cli()))' 2>/dev/null
}

install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "container-engine: installing $* (Debian packages)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "container-engine: $* missing: install them (apt-get install $*), or run as root on Debian" >&2
    exit 1
  fi
}

missing=()
cli=$(buildkit_cli || true)
if [ -z "$cli" ] || ! $cli info >/dev/null 2>&1; then
  # No usable engine yet: Debian's packages give both dockerd and a BuildKit-capable client.
  { command -v dockerd >/dev/null || [ -x /usr/sbin/dockerd ]; } && [ -x /usr/bin/docker ] || missing+=(docker.io)
fi
if [ "${WANT_MMDEBSTRAP:-0}" = 1 ] && ! command -v mmdebstrap >/dev/null; then
  missing+=(mmdebstrap)
fi
((${#missing[@]} == 0)) || install "${missing[@]}"

cli=$(buildkit_cli)
if ! $cli info >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "container-engine: no Docker engine answers, and only root can start dockerd here" >&2
    exit 1
  fi
  mkdir -p "$(dirname "$log")"
  echo "container-engine: starting dockerd (log: $log)"
  PATH=/usr/sbin:/usr/bin:$PATH setsid dockerd >"$log" 2>&1 </dev/null &
  for _ in $(seq 60); do
    $cli info >/dev/null 2>&1 && break
    sleep 1
  done
  if ! $cli info >/dev/null 2>&1; then
    echo "container-engine: dockerd did not answer within 60 s; the end of $log:" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
fi
echo "container-engine: $cli ($($cli version --format '{{.Server.Version}}' 2>/dev/null) engine) answers"
