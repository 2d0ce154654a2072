#!/usr/bin/env bash
# Vendored from the project's shared recipe ../shared/recipes/build-test-image.sh (containers.md,
# "Real container runtimes on this machine kind"), unchanged apart from this note and the marker file.
# Build a minimal Debian 12 directory image with python3 for Charliecloud's
# ch-run, with no container registry. Idempotent; prints timings.
#
# usage: build-test-image.sh [DEST]      DEST defaults to $CH_TEST_IMAGE or /tmp/ch-pyimage
# env:
#   METHOD=hostcopy     (default) copy the files of the host's own installed Debian
#                       python3, dash, libstdc++6 (numpy wheels need it) + dependencies,
#                       from the dpkg file lists: no network, ~2-3 s, ~63 MB
#   METHOD=debootstrap  debootstrap --variant=minbase from the Debian mirror that apt
#                       uses (read from the apt sources): ~45 s, ~160 MB
#   EXTRA_PKGS="..."    more Debian packages (hostcopy: must be installed on the host,
#                       e.g. coreutils; debootstrap: fetched from the mirror)
#   TARBALL=FILE        also write the rootfs as a tar (for `podman import FILE NAME`)
#   FORCE=1             rebuild even if DEST is up to date
#   INSTALL=0           never apt-get install missing tools (default: install when root)
#   MIRROR=URL          debootstrap mirror (default: first Debian URI in the apt sources)
# The image also gets: /dlhub-test-image (a marker file), /data /scratch /opt /srv (bind targets: ch-run cannot create
# them in a read-only image), /ch/environment (read by `ch-run --set-env`),
# /.singularity.d/{runscript,startscript} (exec python3 "$@"), precompiled stdlib
# .pyc, and a stamp file /ch/test-image.stamp.
set -euo pipefail

RECIPE_VERSION=2   # 2: + the marker file /dlhub-test-image (tests prove they ran in the image)
DEST=${1:-${CH_TEST_IMAGE:-/tmp/ch-pyimage}}
case "$DEST" in /*) ;; *) DEST="$PWD/$DEST" ;; esac
DEST=${DEST%/}
METHOD=${METHOD:-hostcopy}
EXTRA_PKGS=${EXTRA_PKGS:-}
INSTALL=${INSTALL:-1}
export USER=${USER:-$(id -un)}          # ch-run refuses to start without $USER
export LC_ALL=C

now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f s", b - a }'; }
log() { printf '[build-test-image] %s\n' "$*"; }
T_ALL=$(now)

need_pkg() {  # need_pkg COMMAND PACKAGE
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$INSTALL" = 0 ] || [ "$(id -u)" != 0 ]; then
    log "missing $1: apt-get install -y --no-install-recommends $2"; exit 2
  fi
  local t; t=$(now)
  apt-get install -y -qq --no-install-recommends "$2" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "$2" >/dev/null; }
  log "installed $2 in $(took "$t")"
}

need_pkg ch-run charliecloud-runtime
if [ "$METHOD" = debootstrap ]; then need_pkg debootstrap debootstrap; fi

# ---- what the image should contain -> stamp -----------------------------
EXCLUDE='^(perl|perl-base|perl-modules-5\.36|libperl5\.36|dpkg|tar|install-info|mailcap|mime-support|media-types)$'
if [ "$METHOD" = hostcopy ]; then
  if ! dpkg-query -W -f='${Status}' python3 2>/dev/null | grep -q 'install ok installed'; then
    need_pkg /usr/bin/python3 python3
  fi
  for p in $EXTRA_PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
      || { log "EXTRA_PKGS: $p is not installed on the host (hostcopy copies host packages)"; exit 2; }
  done
  # shellcheck disable=SC2086
  PKGS=$(apt-cache depends --recurse --installed --no-recommends --no-suggests --no-conflicts \
           --no-breaks --no-replaces --no-enhances python3 dash libstdc++6 $EXTRA_PKGS 2>/dev/null \
         | grep -v '^ ' | grep -v '^<' | sed 's/:.*//' | grep -Ev "$EXCLUDE" | sort -u)
  # shellcheck disable=SC2086
  STAMP="recipe=$RECIPE_VERSION method=hostcopy $(dpkg-query -W -f='${Package}=${Version} ' $PKGS)"
elif [ "$METHOD" = debootstrap ]; then
  if [ -z "${MIRROR:-}" ]; then
    MIRROR=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
             | grep -E '^(URIs:|deb )' | grep -v security \
             | sed -E 's/^URIs:[[:space:]]*//; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//' \
             | awk 'NR == 1 { print $1 }' || true)
  fi
  [ -n "$MIRROR" ] || { log "no Debian mirror found in the apt sources; set MIRROR"; exit 2; }
  STAMP="recipe=$RECIPE_VERSION method=debootstrap suite=bookworm extra=${EXTRA_PKGS// /,}"
else
  log "unknown METHOD=$METHOD (hostcopy|debootstrap)"; exit 2
fi

verify() {
  ch-run "$1" -- python3 -c 'import sys, json, asyncio, subprocess, socket, ssl, sqlite3, multiprocessing, ctypes; print(sys.version.split()[0])'
}

if [ "${FORCE:-0}" != 1 ] && [ -f "$DEST/ch/test-image.stamp" ] \
   && [ "$(cat "$DEST/ch/test-image.stamp")" = "$STAMP" ] && verify "$DEST" >/dev/null 2>&1; then
  log "up to date: $DEST (FORCE=1 rebuilds)"
else
  NEW="$DEST.new.$$"
  trap 'rm -rf "$NEW" "$NEW.files" "$NEW.log"' EXIT
  rm -rf "$NEW"
  T=$(now)
  if [ "$METHOD" = hostcopy ]; then
    mkdir -p "$NEW"/usr/bin "$NEW"/usr/sbin "$NEW"/usr/lib "$NEW"/usr/lib64
    for d in bin sbin lib lib64; do ln -s "usr/$d" "$NEW/$d"; done    # merged /usr, like the host
    # shellcheck disable=SC2086
    dpkg-query -L $PKGS 2>/dev/null | grep '^/' | grep -Ev '^/usr/share/(doc|man|info|locale|lintian)/' | sort -u \
      | while IFS= read -r f; do
          if [ -L "$f" ] || { [ -e "$f" ] && [ ! -d "$f" ]; }; then printf '%s\n' "${f#/}"; fi
        done > "$NEW.files"
    tar -C / -cf - --no-recursion -T "$NEW.files" | tar -C "$NEW" --keep-directory-symlink -xf -
    rm -f "$NEW.files"
    ldconfig -r "$NEW" 2>/dev/null || true
  else
    inc=python3; for p in $EXTRA_PKGS; do inc="$inc,$p"; done
    debootstrap --variant=minbase --include="$inc" bookworm "$NEW" "$MIRROR" > "$NEW.log" 2>&1 \
      || { tail -n 20 "$NEW.log"; rm -f "$NEW.log"; exit 1; }
    rm -f "$NEW.log"
    rm -rf "$NEW"/var/cache/apt/archives/*.deb "$NEW"/var/lib/apt/lists/* "$NEW"/usr/share/doc "$NEW"/usr/share/man
  fi
  log "rootfs ($METHOD) in $(took "$T")"

  # skeleton that ch-run (and the tests) expect
  mkdir -p "$NEW"/{dev,proc,sys,tmp,home,mnt,root,run,var/tmp,etc,opt,srv,data,scratch,ch,.singularity.d}
  chmod 1777 "$NEW/tmp" "$NEW/var/tmp"
  [ -s "$NEW/etc/passwd" ] || printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' > "$NEW/etc/passwd"
  [ -s "$NEW/etc/group" ] || printf 'root:x:0:\nnogroup:x:65534:\n' > "$NEW/etc/group"
  touch "$NEW/etc/hosts" "$NEW/etc/resolv.conf"
  printf 'dlhub test image (scripts/build-test-image.sh)\n' > "$NEW/dlhub-test-image"   # only in the image
  printf 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nLANG=C.UTF-8\n' > "$NEW/ch/environment"
  for s in runscript startscript; do
    printf '#!/bin/sh\nexec python3 "$@"\n' > "$NEW/.singularity.d/$s"; chmod 755 "$NEW/.singularity.d/$s"
  done

  # precompile the stdlib inside the image: without .pyc every start recompiles
  # in memory (the image is mounted read-only), e.g. `import asyncio` 300 ms vs 70 ms
  T=$(now)
  ch-run -w "$NEW" -- python3 -m compileall -q -j0 /usr/lib/python3.11 /usr/lib/python3/dist-packages >/dev/null 2>&1 || true
  log "compileall in $(took "$T")"

  printf '%s' "$STAMP" > "$NEW/ch/test-image.stamp"
  verify "$NEW" >/dev/null
  rm -rf "$DEST.old"
  if [ -e "$DEST" ]; then mv "$DEST" "$DEST.old"; fi
  mv "$NEW" "$DEST"
  rm -rf "$DEST.old"
  trap - EXIT
  log "built $DEST ($(du -sh "$DEST" | cut -f1))"
fi

if [ -n "${TARBALL:-}" ]; then
  T=$(now); tar -C "$DEST" -cf "$TARBALL" .; log "rootfs tarball $TARBALL in $(took "$T")"
fi

log "python in image: $(verify "$DEST")"
# cold start of a fresh container: median of 10 `ch-run IMAGE -- python3 -c pass`
ch-run "$DEST" -- python3 -c pass
for _ in 1 2 3 4 5 6 7 8 9 10; do
  a=$(date +%s%N); ch-run "$DEST" -- python3 -c pass; b=$(date +%s%N); echo $(( (b - a) / 1000 ))
done | sort -n | awk '{ v[NR] = $1 } END { printf "[build-test-image] ch-run python3 -c pass: median %.1f ms (min %.1f, max %.1f, n=10)\n", (v[5] + v[6]) / 2000, v[1] / 1000, v[10] / 1000 }'
log "total $(took "$T_ALL")"
log "run: ch-run -b HOSTDIR:/data $DEST -- python3 -c 'print(1)'"
