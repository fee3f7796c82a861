#!/usr/bin/env bash
# Builds the tiny Linux test guest the e2e tests boot under QEMU (TCG):
#   OUT_DIR/vmlinuz            Debian's cloud kernel
#   OUT_DIR/initramfs.cpio.gz  busybox (static), the virtio/ext4 modules the
#                              kernel has as modules, qemu-ga with its
#                              libraries, and tests/guest/init.sh as /init
#   OUT_DIR/VERSION            stamp of the inputs; a rerun with the same
#                              inputs does nothing
# Usage: build-test-guest.sh [OUT_DIR]
#   default OUT_DIR: ${VMREPLICA_GUEST_DIR:-/var/cache/vmreplica/test-guest}
# Needs apt (run as root), dpkg, busybox-static, cpio, gzip, objcopy.
set -euo pipefail

die() { echo "build-test-guest: ERROR: $*" >&2; exit 1; }
say() { echo "build-test-guest: $*"; }

REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT_DIR="${1:-${VMREPLICA_GUEST_DIR:-/var/cache/vmreplica/test-guest}}"
INIT="$REPO/tests/guest/init.sh"
BUSYBOX=/bin/busybox

[ -f "$INIT" ] || die "missing $INIT"
[ -x "$BUSYBOX" ] || die "missing $BUSYBOX (install busybox-static)"
for tool in apt-get apt-cache dpkg dpkg-query cpio gzip objcopy ldd sha256sum flock; do
  command -v "$tool" >/dev/null || die "missing tool: $tool"
done

# The versioned kernel package the meta package points at.
KPKG="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
[ -n "$KPKG" ] || die "cannot resolve the kernel package behind linux-image-cloud-amd64 (apt-get update?)"
candidate() { apt-cache policy "$1" | awk '/Candidate:/ {print $2}'; }
KVER_PKG="$(candidate "$KPKG")"
QGA_VER="$(candidate qemu-guest-agent)"
[ -n "$KVER_PKG" ] && [ "$KVER_PKG" != "(none)" ] || die "no candidate version for $KPKG"
[ -n "$QGA_VER" ] && [ "$QGA_VER" != "(none)" ] || die "no candidate version for qemu-guest-agent"
BB_VER="$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || echo unknown)"

STAMP="$(printf 'kernel %s %s\nqemu-guest-agent %s\nbusybox-static %s\ninit %s\nscript %s\n' \
  "$KPKG" "$KVER_PKG" "$QGA_VER" "$BB_VER" \
  "$(sha256sum "$INIT" | cut -d' ' -f1)" "$(sha256sum "$0" | cut -d' ' -f1)")"

mkdir -p "$OUT_DIR" 2>/dev/null || die "cannot create $OUT_DIR (run as root, or pass a writable OUT_DIR)"
[ -w "$OUT_DIR" ] || die "$OUT_DIR is not writable (run as root, or pass a writable OUT_DIR)"
# One build at a time per OUT_DIR (test runs may start this concurrently).
exec 9>"$OUT_DIR/.lock"
flock 9

if [ -f "$OUT_DIR/VERSION" ] && [ -f "$OUT_DIR/vmlinuz" ] && [ -f "$OUT_DIR/initramfs.cpio.gz" ] &&
   [ "$(cat "$OUT_DIR/VERSION")" = "$STAMP" ]; then
  say "up to date in $OUT_DIR ($KPKG $KVER_PKG)"
  exit 0
fi

WORK="$(mktemp -d /tmp/vmr-guest-build-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
say "work dir $WORK"
# apt downloads as its sandbox user _apt when that user may write the directory.
chmod 755 "$WORK"
mkdir "$WORK/dl"
if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$WORK/dl"; fi

say "apt-get download $KPKG qemu-guest-agent"
(cd "$WORK/dl" && apt-get download -q "$KPKG" qemu-guest-agent) || die "apt-get download failed"
KDEB="$(ls "$WORK"/dl/"$KPKG"_*.deb)"
QDEB="$(ls "$WORK"/dl/qemu-guest-agent_*.deb)"
say "dpkg -x $(basename "$KDEB")"
dpkg -x "$KDEB" "$WORK/kernel"
say "dpkg -x $(basename "$QDEB")"
dpkg -x "$QDEB" "$WORK/qga"

VMLINUZ="$(ls "$WORK"/kernel/boot/vmlinuz-* 2>/dev/null | head -n 1)"
[ -n "$VMLINUZ" ] || die "no boot/vmlinuz-* in $KDEB"
KREL="${VMLINUZ##*/vmlinuz-}"
MODDIR="$WORK/kernel/lib/modules/$KREL"
[ -d "$MODDIR" ] || die "no lib/modules/$KREL in $KDEB"

ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,mnt,var,lib/modules,lib64,lib/x86_64-linux-gnu}

say "busybox $BB_VER"
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list-full); do
  [ "$applet" = bin/busybox ] && continue
  mkdir -p "$ROOT/$(dirname "$applet")"
  ln -sf /bin/busybox "$ROOT/$applet"
done
cp "$INIT" "$ROOT/init"
chmod 755 "$ROOT/init"

# Kernel modules: the wanted ones that are not built in, with their
# dependencies (from each module's .modinfo "depends="; the .deb carries no
# modules.dep), listed dependencies first in /etc/vmr-modules.
declare -A MODPATH=()
while IFS= read -r ko; do
  base="${ko##*/}"; base="${base%%.ko*}"; base="${base//-/_}"
  MODPATH[$base]="$ko"
done < <(find "$MODDIR/kernel" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst')
declare -A BUILTIN=()
while IFS= read -r b; do
  base="${b##*/}"; base="${base%.ko}"; base="${base//-/_}"
  BUILTIN[$base]=1
done < "$MODDIR/modules.builtin"
declare -A DONE=()
ORDER=()
add_module() {
  local m="${1//-/_}"
  [ -n "${DONE[$m]:-}" ] && return 0
  DONE[$m]=1
  if [ -n "${BUILTIN[$m]:-}" ]; then return 0; fi
  local ko="${MODPATH[$m]:-}"
  [ -n "$ko" ] || die "kernel module $m is neither built in nor in $KPKG"
  local plain="$WORK/mods/$m.ko"
  mkdir -p "$WORK/mods"
  case "$ko" in
    *.ko.xz) xz -dc "$ko" >"$plain" ;;
    *.ko.zst) zstd -qdc "$ko" >"$plain" ;;
    *) cp "$ko" "$plain" ;;
  esac
  local deps
  deps="$(objcopy -O binary --only-section=.modinfo "$plain" /dev/stdout | tr '\0' '\n' |
          sed -n 's/^depends=//p' | tr ',' ' ')"
  local d
  for d in $deps; do add_module "$d"; done
  ORDER+=("$m")
}
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk virtio_console \
         crc16 mbcache jbd2 crc32c_generic ext4; do
  add_module "$m"
done
: >"$ROOT/etc/vmr-modules"
for m in "${ORDER[@]}"; do
  cp "$WORK/mods/$m.ko" "$ROOT/lib/modules/$m.ko"
  echo "$m.ko" >>"$ROOT/etc/vmr-modules"
done
say "modules (load order): ${ORDER[*]}"

# qemu-ga and the libraries it links (this host is Debian 12 too).
say "qemu-ga $QGA_VER"
cp "$WORK/qga/usr/sbin/qemu-ga" "$ROOT/usr/sbin/qemu-ga"
LDD_OUT="$(ldd "$WORK/qga/usr/sbin/qemu-ga")" || die "ldd qemu-ga failed"
if grep -q 'not found' <<<"$LDD_OUT"; then die "qemu-ga libraries missing on this host: $LDD_OUT"; fi
for lib in $(awk '/=> \// {print $3} /^\s*\/lib64\// {print $1}' <<<"$LDD_OUT"); do
  case "$lib" in
    /lib64/*) cp -L "$lib" "$ROOT/lib64/" ;;
    *) cp -L "$lib" "$ROOT/lib/x86_64-linux-gnu/" ;;
  esac
done
[ -f "$ROOT/lib64/ld-linux-x86-64.so.2" ] || cp -L /lib64/ld-linux-x86-64.so.2 "$ROOT/lib64/"

say "packing initramfs"
(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --owner=0:0) |
  gzip -9 >"$OUT_DIR/initramfs.cpio.gz.tmp"
cp "$VMLINUZ" "$OUT_DIR/vmlinuz.tmp"
mv -f "$OUT_DIR/initramfs.cpio.gz.tmp" "$OUT_DIR/initramfs.cpio.gz"
mv -f "$OUT_DIR/vmlinuz.tmp" "$OUT_DIR/vmlinuz"
printf '%s\n' "$STAMP" >"$OUT_DIR/VERSION.tmp"
mv -f "$OUT_DIR/VERSION.tmp" "$OUT_DIR/VERSION"
say "built $OUT_DIR: vmlinuz ($KREL), initramfs.cpio.gz ($(du -h "$OUT_DIR/initramfs.cpio.gz" | cut -f1))"
