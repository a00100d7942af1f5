#!/usr/bin/env bash
# An emulated 64-bit ARM board, a stand-in Raspberry Pi 4, reachable over ssh.
#
# The board is a Debian bookworm arm64 root in a folder. Its binaries run on
# this x86_64 host through qemu-user and binfmt_misc, and its own aarch64 sshd
# listens on 127.0.0.1. See README.md beside this file.
#
# Usage: board.sh {build|start [--port P]|stop|status|ssh-config}
#
# Environment:
#   DIFFTX_BOARD_DIR     state: the unpacked root, keys, ssh_config
#                        (default /var/tmp/difftx-arm64-board)
#   DIFFTX_EDGE_CACHE    cache root; root tarballs and wheels go to
#                        $DIFFTX_EDGE_CACHE/arm64_board (default ~/.cache/difftx-edge)
#   HOST_PYTHON          python whose numpy, onnxruntime and ai-edge-litert
#                        versions the board gets (default python3)
#   DIFFTX_BOARD_MIRROR  Debian mirror (default http://deb.debian.org/debian)
#   DIFFTX_BOARD_START_TIMEOUT  seconds to wait for sshd (default 180)
set -euo pipefail

SCRIPT_PATH="$(realpath "${BASH_SOURCE[0]}")"
STATE_DIR="$(realpath -m "${DIFFTX_BOARD_DIR:-/var/tmp/difftx-arm64-board}")"
CACHE_DIR="$(realpath -m "${DIFFTX_EDGE_CACHE:-${HOME:-/root}/.cache/difftx-edge}/arm64_board")"
readonly SCRIPT_PATH STATE_DIR CACHE_DIR
readonly CPUINFO_SRC="${SCRIPT_PATH%/*}/cpuinfo-pi4.txt"
readonly ROOT="$STATE_DIR/root"
readonly KEY_DIR="$STATE_DIR/keys"
readonly SSH_CONFIG="$STATE_DIR/ssh_config"

readonly SUITE=bookworm
readonly MIRROR="${DIFFTX_BOARD_MIRROR:-http://deb.debian.org/debian}"
readonly BOARD_DEBS=(python3 python3-venv openssh-server)
readonly BOARD_PYTHON_TAG=3.11          # bookworm's python3
readonly BOARD_GLIBC_MINOR=36           # bookworm's glibc 2.36
readonly PY_DISTS=(numpy onnxruntime ai-edge-litert)
readonly VENV=/opt/venv
readonly BOARD_PATH="$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
readonly BOARD_CPU=cortex-a72           # QEMU_CPU: the Pi 4's core
readonly DEFAULT_PORT=2222
readonly HOST_DEBS=(debootstrap qemu-user-static zstd openssh-client)
readonly BINFMT=/proc/sys/fs/binfmt_misc

die() { echo "board.sh: error: $*" >&2; exit 1; }
log() { echo "board.sh: $*" >&2; }

usage() {
  echo "usage: board.sh {build|start [--port P]|stop|status|ssh-config}" >&2
  exit 2
}

# --- host preparation -------------------------------------------------------

require_root() {
  [[ "$(id -u)" -eq 0 ]] || die "must run as root (it mounts, chroots and registers binfmt_misc)"
  [[ "$STATE_DIR" != / && "$STATE_DIR" != *[[:space:]]* ]] \
    || die "DIFFTX_BOARD_DIR must be a folder other than / without spaces: '$STATE_DIR'"
}

# One board.sh at a time per state dir.
take_lock() {
  mkdir -p "$STATE_DIR"
  exec 9>"$STATE_DIR/lock"
  flock -w 600 9 || die "another board.sh holds $STATE_DIR/lock"
}

ensure_host_debs() {
  local missing=() cmd
  for cmd in debootstrap qemu-aarch64-static zstd ssh ssh-keygen; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  log "installing host packages (${missing[*]} missing): ${HOST_DEBS[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get -o DPkg::Lock::Timeout=600 update -qq \
      && apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${HOST_DEBS[@]}"; } >&2; then
    die "apt-get install ${HOST_DEBS[*]} failed"
  fi
}

# Make sure the kernel runs aarch64 ELF files through qemu-aarch64-static.
# Sets BINFMT_FIX=1 when the interpreter is opened at registration (F flag),
# so a chroot needs no copy of qemu.
ensure_binfmt() {
  if [[ ! -e "$BINFMT/register" ]]; then
    mount -t binfmt_misc binfmt_misc "$BINFMT" 2>/dev/null \
      || die "cannot mount binfmt_misc on $BINFMT (needs root and CONFIG_BINFMT_MISC; a container must be privileged)"
  fi
  [[ "$(cat "$BINFMT/status")" == enabled ]] || echo 1 >"$BINFMT/status" 2>/dev/null \
    || die "cannot enable binfmt_misc ($BINFMT/status)"
  if [[ ! -e "$BINFMT/qemu-aarch64" ]]; then
    local conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    [[ -r "$conf" ]] || die "$conf is missing: install qemu-user-static"
    cat "$conf" >"$BINFMT/register" 2>/dev/null \
      || die "cannot register qemu-aarch64 with binfmt_misc ($BINFMT/register)"
  fi
  if [[ "$(head -n1 "$BINFMT/qemu-aarch64")" != enabled ]]; then
    echo 1 >"$BINFMT/qemu-aarch64" 2>/dev/null || die "cannot enable binfmt_misc entry qemu-aarch64"
  fi
  BINFMT_INTERP="$(sed -n 's/^interpreter //p' "$BINFMT/qemu-aarch64")"
  BINFMT_FIX=0
  [[ "$(sed -n 's/^flags: //p' "$BINFMT/qemu-aarch64")" == *F* ]] && BINFMT_FIX=1
  [[ -x "$BINFMT_INTERP" ]] || die "binfmt_misc qemu-aarch64 interpreter $BINFMT_INTERP is missing"
}

# Without the F flag the kernel looks the interpreter up inside the chroot.
place_interpreter() {
  local root="$1"
  [[ "$BINFMT_FIX" -eq 1 ]] && return 0
  mkdir -p "$root$(dirname "$BINFMT_INTERP")"
  cp -L "$BINFMT_INTERP" "$root$BINFMT_INTERP"
}

# Proves that aarch64 binaries in the root really run.
check_exec() {
  local root="$1" arch
  arch="$(in_board "$root" /usr/bin/uname -m 2>/dev/null)" || arch="(failed)"
  [[ "$arch" == aarch64 ]] \
    || die "aarch64 binaries do not run in $root (uname -m: $arch); binfmt_misc qemu-aarch64 is not working"
}

# Runs a command (or a function) at low priority: the build shares the host.
niced() {
  (renice -n 10 -p "$BASHPID" >/dev/null && "$@")
}

# Runs a command inside a root, with a clean environment and the Pi 4's CPU.
in_board() {
  local root="$1"
  shift
  QEMU_CPU="$BOARD_CPU" chroot "$root" /usr/bin/env -i \
    PATH="$BOARD_PATH" HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
    QEMU_CPU="$BOARD_CPU" "$@"
}

# --- mounts -----------------------------------------------------------------

# Mount points at or under a folder, children first.
mounts_under() {
  awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | tac
}

umount_under() {
  local dir="$1" mp try
  [[ "$dir" == "$STATE_DIR"/* ]] || die "refusing to unmount outside $STATE_DIR: $dir"
  for try in 1 2 3; do
    [[ -z "$(mounts_under "$dir")" ]] && return 0
    while read -r mp; do
      umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true
    done < <(mounts_under "$dir")
  done
  [[ -z "$(mounts_under "$dir")" ]] || die "cannot unmount: $(mounts_under "$dir" | tr '\n' ' ')"
}

# A mount that does not propagate to or from the host's own.
mount_private() {
  mount "$@"
  mount --make-private "${!#}"
}

# proc (with the ARM cpuinfo on top), sys, dev, dev/pts, dev/shm.
mount_board() {
  local root="$1"
  umount_under "$root"
  install -m 0644 "$CPUINFO_SRC" "$STATE_DIR/cpuinfo"
  mount_private -t proc proc "$root/proc"
  mount_private --bind "$STATE_DIR/cpuinfo" "$root/proc/cpuinfo"
  mount_private --bind /sys "$root/sys"
  mount_private --bind /dev "$root/dev"
  mount_private --bind /dev/pts "$root/dev/pts"
  mount_private -t tmpfs -o mode=1777,size=256m tmpfs "$root/dev/shm"
  grep -q 'CPU part' "$root/proc/cpuinfo" || die "the ARM cpuinfo did not mount over $root/proc/cpuinfo"
}

# Removes a root folder, only when nothing is mounted under it.
remove_root() {
  local root="$1"
  [[ -e "$root" ]] || return 0
  umount_under "$root"
  rm -rf --one-file-system "$root"
}

# --- build ------------------------------------------------------------------

# "numpy==2.4.6 onnxruntime==... ai-edge-litert==..." read from HOST_PYTHON.
host_versions() {
  local py="${HOST_PYTHON:-python3}"
  command -v "$py" >/dev/null || die "HOST_PYTHON=$py not found"
  "$py" - "${PY_DISTS[@]}" <<'EOF'
import importlib.metadata as md
import sys

pins = []
for name in sys.argv[1:]:
    try:
        pins.append(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        sys.exit(f"board.sh: error: {sys.executable} has no {name}; "
                 "set HOST_PYTHON to the project's venv python")
print(" ".join(pins))
EOF
}

cache_key() {
  { cat "$SCRIPT_PATH" "$CPUINFO_SRC"; echo "$1"; } | sha256sum | cut -c1-16
}

running_pid() {
  local pid
  pid="$(cat "$ROOT/run/sshd.pid" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ "$(readlink "/proc/$pid/root" 2>/dev/null)" == "$ROOT" ]] || return 1
  echo "$pid"
}

# pip download of the aarch64 cp311 wheels on the host: no emulation.
download_wheels() {
  local dest="$1" plats=() minor
  shift
  local py="${HOST_PYTHON:-python3}"
  "$py" -m pip --version >/dev/null 2>&1 || die "HOST_PYTHON=$py has no pip (needed to download the board's wheels)"
  # pip matches manylinux tags exactly, so list every glibc the board can run.
  for ((minor = BOARD_GLIBC_MINOR; minor >= 17; minor--)); do
    plats+=(--platform "manylinux_2_${minor}_aarch64")
  done
  plats+=(--platform manylinux2014_aarch64)
  "$py" -m pip download -q --disable-pip-version-check --dest "$dest" --only-binary=:all: \
    "${plats[@]}" --python-version "$BOARD_PYTHON_TAG" --implementation cp \
    --abi "cp${BOARD_PYTHON_TAG/./}" "$@" >&2 \
    || die "pip download of the aarch64 wheels failed: $*"
}

build_from_scratch() {
  local tarball="$1" pins="$2" key="$3"
  local work="$STATE_DIR/root.build" t
  local wheels="$CACHE_DIR/wheels"
  remove_root "$work"
  trap 'umount_under "'"$work"'"; rm -f "'"$tarball.tmp.$$"'"' EXIT
  local times="$STATE_DIR/build-times.txt"
  : >"$times"

  t=$SECONDS
  log "debootstrap first stage ($SUITE arm64 minbase)"
  niced debootstrap --foreign --arch=arm64 --variant=minbase \
    "$SUITE" "$work" "$MIRROR" >"$STATE_DIR/debootstrap.log" 2>&1 \
    || die "debootstrap first stage failed (log: $STATE_DIR/debootstrap.log)"
  echo "debootstrap_first_stage_s $((SECONDS - t))" >>"$times"

  t=$SECONDS
  log "debootstrap second stage (emulated)"
  place_interpreter "$work"
  check_exec "$work"
  # No init runs in the board: packages must not try to start services.
  printf '#!/bin/sh\nexit 101\n' >"$work/usr/sbin/policy-rc.d"
  chmod 0755 "$work/usr/sbin/policy-rc.d"
  niced in_board "$work" /debootstrap/debootstrap --second-stage >>"$STATE_DIR/debootstrap.log" 2>&1 \
    || die "debootstrap second stage failed (log: $STATE_DIR/debootstrap.log)"
  umount_under "$work"
  echo "debootstrap_second_stage_s $((SECONDS - t))" >>"$times"

  # A separate apt round took about 10 % less time and CPU here than
  # debootstrap --include of the same packages.
  t=$SECONDS
  log "apt-get install ${BOARD_DEBS[*]} (emulated)"
  echo "deb $MIRROR $SUITE main" >"$work/etc/apt/sources.list"
  mount_board "$work"
  niced in_board "$work" sh -c 'apt-get update -q && apt-get install -y -q --no-install-recommends "$@"' \
    apt "${BOARD_DEBS[@]}" >"$STATE_DIR/apt.log" 2>&1 \
    || die "apt-get install in the board failed (log: $STATE_DIR/apt.log)"
  umount_under "$work"
  echo "apt_install_s $((SECONDS - t))" >>"$times"

  t=$SECONDS
  log "downloading aarch64 wheels on the host: $pins"
  mkdir -p "$wheels"
  # shellcheck disable=SC2086  # pins is a space-separated list of requirements
  download_wheels "$wheels" $pins
  echo "wheels_download_s $((SECONDS - t))" >>"$times"

  t=$SECONDS
  log "creating $VENV in the board and installing the wheels offline (emulated)"
  mkdir -p "$work/tmp/wheels"
  cp "$wheels"/*.whl "$work/tmp/wheels/"
  # shellcheck disable=SC2086
  niced in_board "$work" sh -c "python3 -m venv '$VENV' && '$VENV/bin/pip' install -q \
      --no-index --no-cache-dir --disable-pip-version-check --find-links /tmp/wheels $pins" \
    >"$STATE_DIR/pip.log" 2>&1 || die "pip install in the board failed (log: $STATE_DIR/pip.log)"
  rm -rf "$work/tmp/wheels"
  echo "wheels_install_s $((SECONDS - t))" >>"$times"

  t=$SECONDS
  log "checking the runtimes import in the board"
  mount_board "$work"
  niced in_board "$work" python3 -c \
    'import numpy, onnxruntime, ai_edge_litert.interpreter' >>"$STATE_DIR/pip.log" 2>&1 \
    || die "numpy/onnxruntime/ai_edge_litert do not import in the board (log: $STATE_DIR/pip.log)"
  umount_under "$work"
  echo "import_check_s $((SECONDS - t))" >>"$times"

  # Tidy: host keys are made per state dir at start; apt lists and debs are
  # not needed to run.
  rm -f "$work"/etc/ssh/ssh_host_*
  rm -rf "$work"/var/cache/apt/*.bin "$work"/var/cache/apt/archives/*.deb "$work"/var/lib/apt/lists/*
  printf 'DIFFTX_BOARD_KEY=%s\nDIFFTX_BOARD_PINS="%s"\n' "$key" "$pins" >"$work/etc/difftx-board"

  t=$SECONDS
  log "packing $tarball"
  mkdir -p "$CACHE_DIR"
  tar --numeric-owner --xattrs --xattrs-include='*' --one-file-system -C "$work" -cf - . \
    | niced zstd -q -T2 -10 -o "$tarball.tmp.$$" \
    || die "packing the root into $tarball failed"
  mv "$tarball.tmp.$$" "$tarball"
  echo "pack_s $((SECONDS - t))" >>"$times"

  trap - EXIT
  mv "$work" "$ROOT"
}

cmd_build() {
  require_root
  take_lock
  ensure_host_debs
  ensure_binfmt
  local pins key tarball t=$SECONDS
  pins="$(host_versions)"
  key="$(cache_key "$pins")"
  tarball="$CACHE_DIR/rootfs-$key.tar.zst"

  if [[ -d "$ROOT" && "$(cat "$STATE_DIR/root.key" 2>/dev/null)" == "$key" ]]; then
    log "board root is up to date ($key: $pins)"
    return 0
  fi
  running_pid >/dev/null && die "the board is running an older root: run board.sh stop first"
  remove_root "$ROOT"
  rm -f "$STATE_DIR/root.key"

  if [[ -f "$tarball" ]]; then
    log "unpacking cached $tarball"
    mkdir -p "$ROOT"
    zstd -dc "$tarball" \
      | tar --numeric-owner --xattrs --xattrs-include='*' -xpf - -C "$ROOT" \
      || die "unpacking $tarball failed"
  else
    log "no cached root for $key: building from scratch (5-7 minutes on 2 cores)"
    build_from_scratch "$tarball" "$pins" "$key"
  fi
  place_interpreter "$ROOT"
  check_exec "$ROOT"
  echo "$key" >"$STATE_DIR/root.key"
  log "built $ROOT in $((SECONDS - t)) s ($pins)"
}

# --- start / stop -----------------------------------------------------------

write_sshd_config() {
  local port="$1"
  mkdir -p "$ROOT/etc/ssh/sshd_config.d"
  # Debian's sshd_config includes sshd_config.d first; the first value wins.
  cat >"$ROOT/etc/ssh/sshd_config.d/difftx-board.conf" <<EOF
# Written by benchmarks/arm64_board/board.sh start
ListenAddress 127.0.0.1:$port
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile /run/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# sshd clears the environment: qemu's CPU model and the venv come from here.
SetEnv QEMU_CPU=$BOARD_CPU PATH=$BOARD_PATH
EOF
}

write_ssh_config() {
  local port="$1"
  # "board" for people; 127.0.0.1 too, for difftx-edge bench --target ssh://root@127.0.0.1:PORT --ssh-config.
  cat >"$SSH_CONFIG" <<EOF
Host board 127.0.0.1
  HostName 127.0.0.1
  Port $port
  User root
  IdentityFile $KEY_DIR/client_ed25519
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
EOF
}

install_keys() {
  mkdir -p "$KEY_DIR"
  chmod 0700 "$KEY_DIR"
  [[ -f "$KEY_DIR/client_ed25519" ]] \
    || ssh-keygen -q -t ed25519 -N '' -C difftx-board-client -f "$KEY_DIR/client_ed25519"
  [[ -f "$KEY_DIR/ssh_host_ed25519_key" ]] \
    || ssh-keygen -q -t ed25519 -N '' -C difftx-board-host -f "$KEY_DIR/ssh_host_ed25519_key"
  install -d -m 0700 "$ROOT/root/.ssh"
  install -m 0600 "$KEY_DIR/client_ed25519.pub" "$ROOT/root/.ssh/authorized_keys"
  install -m 0600 "$KEY_DIR/ssh_host_ed25519_key" "$ROOT/etc/ssh/ssh_host_ed25519_key"
  install -m 0644 "$KEY_DIR/ssh_host_ed25519_key.pub" "$ROOT/etc/ssh/ssh_host_ed25519_key.pub"
}

port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

cmd_start() {
  local port=""
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --port) [[ $# -ge 2 ]] || usage; port="$2"; shift 2 ;;
      --port=*) port="${1#--port=}"; shift ;;
      *) usage ;;
    esac
  done
  [[ -z "$port" || "$port" =~ ^[0-9]+$ ]] || die "--port must be a number: $port"
  require_root
  take_lock
  [[ -d "$ROOT" && -f "$STATE_DIR/root.key" ]] || die "no board in $ROOT: run board.sh build first"

  local pid running_port
  if pid="$(running_pid)"; then
    running_port="$(cat "$STATE_DIR/port")"
    [[ -z "$port" || "$port" == "$running_port" ]] \
      || die "the board already runs on port $running_port: run board.sh stop first"
    log "already running (pid $pid)"
    echo "ssh://root@127.0.0.1:$running_port"
    return 0
  fi
  port="${port:-$DEFAULT_PORT}"
  port_in_use "$port" && die "port $port on 127.0.0.1 is already in use"

  ensure_host_debs
  ensure_binfmt
  place_interpreter "$ROOT"
  stop_board_processes
  mount_board "$ROOT"
  install_keys
  write_sshd_config "$port"
  write_ssh_config "$port"
  echo "$port" >"$STATE_DIR/port"
  install -d -m 0755 "$ROOT/run/sshd"
  rm -f "$ROOT/run/sshd.pid"
  # The benchmark harness marks every row measured here "emulated": QEMU's timings are not a Pi's.
  install -d -m 0755 "$ROOT/etc/difftx-edge"
  touch "$ROOT/etc/difftx-edge/emulated-board"

  local sshd_log=/var/log/difftx-sshd.log
  in_board "$ROOT" /usr/sbin/sshd -t >"$STATE_DIR/sshd-test.log" 2>&1 \
    || die "the board's sshd config is invalid: $(tail -n1 "$STATE_DIR/sshd-test.log")"
  in_board "$ROOT" /usr/sbin/sshd -E "$sshd_log" 9>&- \
    || die "the board's sshd did not start (log: $ROOT$sshd_log)"

  local timeout="${DIFFTX_BOARD_START_TIMEOUT:-180}" t0=$SECONDS
  until ssh -F "$SSH_CONFIG" -o ConnectTimeout=20 -o BatchMode=yes board true </dev/null 2>/dev/null; do
    # sshd writes its pid file once it listens: give it a few seconds.
    if ((SECONDS - t0 >= 10)) && ! running_pid >/dev/null; then
      die "the board's sshd exited: $(tail -n1 "$ROOT$sshd_log" 2>/dev/null)"
    fi
    if ((SECONDS - t0 >= timeout)); then
      die "sshd on 127.0.0.1:$port accepted no connection within ${timeout}s (log: $ROOT$sshd_log)"
    fi
    sleep 1
  done
  log "board up in $((SECONDS - t0)) s; try: ssh -F $SSH_CONFIG board"
  echo "ssh://root@127.0.0.1:$port"
}

# TERM, then KILL, every process whose root is the board (sshd and sessions).
stop_board_processes() {
  local pids=() p try
  for try in 1 2 3 4 5 6 7 8 9 10 11; do
    pids=()
    for p in /proc/[0-9]*; do
      [[ "$(readlink "$p/root" 2>/dev/null)" == "$ROOT" ]] && pids+=("${p#/proc/}")
    done
    [[ ${#pids[@]} -eq 0 ]] && return 0
    if [[ "$try" -lt 10 ]]; then kill -TERM "${pids[@]}" 2>/dev/null || true
    else kill -KILL "${pids[@]}" 2>/dev/null || true; fi
    sleep 1
  done
  die "board processes survived SIGKILL: ${pids[*]}"
}

cmd_stop() {
  require_root
  take_lock
  [[ -d "$ROOT" ]] || { log "no board in $ROOT"; return 0; }
  stop_board_processes
  umount_under "$ROOT"
  rm -f "$ROOT/run/sshd.pid"
  log "stopped"
}

cmd_status() {
  local pid
  if pid="$(running_pid)"; then
    echo "running: yes (sshd pid $pid)"
    echo "port: $(cat "$STATE_DIR/port")"
    echo "ssh: ssh -F $SSH_CONFIG board"
  else
    echo "running: no"
  fi
  if [[ -d "$ROOT" ]]; then
    echo "root: $ROOT ($(du -sxh "$ROOT" 2>/dev/null | cut -f1), key $(cat "$STATE_DIR/root.key" 2>/dev/null || echo none))"
  else
    echo "root: none (run board.sh build)"
  fi
  [[ -n "${pid:-}" ]] || return 3
}

cmd_ssh_config() {
  [[ -f "$SSH_CONFIG" ]] || die "no $SSH_CONFIG: run board.sh start"
  echo "$SSH_CONFIG"
}

main() {
  [[ $# -ge 1 ]] || usage
  local cmd="$1"
  shift
  case "$cmd" in
    build) [[ $# -eq 0 ]] || usage; cmd_build ;;
    start) cmd_start "$@" ;;
    stop) [[ $# -eq 0 ]] || usage; cmd_stop ;;
    status) [[ $# -eq 0 ]] || usage; cmd_status ;;
    ssh-config) [[ $# -eq 0 ]] || usage; cmd_ssh_config ;;
    *) usage ;;
  esac
}

main "$@"
