# Shared by scripts/peers/*.sh (sourced, not run): Debian packages for the real peers.
#   apt_missing PKG...       prints those of PKG... that are not installed, one per line
#   apt_install WHO PKG...   installs PKG... (as root, else through sudo); WHO names the caller
#                            in its messages; fails with a clear line where there is no apt-get
apt_missing() {
  local pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
  done
}

apt_install() {
  local who="$1"
  shift
  if ! command -v apt-get >/dev/null; then
    echo "$who: missing $* and no apt-get here; install them by hand" >&2
    return 1
  fi
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    sudo=(sudo)
  fi
  echo "$who: installing $*" >&2
  # (env: sudo would drop DEBIAN_FRONTEND; the lock timeout waits for another apt run)
  local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600)
  "${apt[@]}" update -qq
  "${apt[@]}" install -y -qq --no-install-recommends "$@" >/dev/null
}
