#!/bin/sh
# /init of the vmreplica test guest (packed into initramfs.cpio.gz by
# scripts/build-test-guest.sh; runs under busybox sh as PID 1).
#
# Boot: mounts proc/sys/dev, loads the modules listed in /etc/vmr-modules
# (dependency order, computed at build time), waits for the disks and the
# agent port the host announced on the kernel command line
# (vmr.disks=N, vmr.qga=1), starts qemu-ga, then serves the serial console.
#
# Serial protocol (one command per line, host -> guest):
#   "<id> <shell command>"  runs the command with /bin/sh (stdin /dev/null),
#                           then prints "@@BEGIN <id>\n" <output> "\n@@END <id> <exit code>\n"
#                           (the newline before @@END is always added: the
#                           host drops exactly one).
#   "<id> @@POWEROFF" or "@@POWEROFF"   syncs and powers off at once.
# Echo and output post-processing are off, so the host sees the bytes as
# written. Kernel messages are limited to emergencies once the loop runs.

PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH

mkdir -p /proc /sys /dev /run /tmp /mnt /var
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
ln -s /run /var/run 2>/dev/null

if [ -f /etc/vmr-modules ]; then
  while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/$mod" || echo "vmr-init: insmod $mod failed" >/dev/console
  done </etc/vmr-modules
fi

want_disks=0
want_qga=0
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    vmr.disks=*) want_disks="${arg#vmr.disks=}" ;;
    vmr.qga=1) want_qga=1 ;;
  esac
done

# Devices appear asynchronously after insmod: wait up to 30 s for them.
tries=0
while [ "$tries" -lt 300 ]; do
  have=$(ls /sys/block 2>/dev/null | grep -c '^vd')
  ok=1
  [ "$have" -ge "$want_disks" ] || ok=0
  if [ "$want_qga" = 1 ]; then
    ls /dev/vport* >/dev/null 2>&1 || ok=0
  fi
  [ "$ok" = 1 ] && break
  tries=$((tries + 1))
  sleep 0.1
done
[ "$ok" = 1 ] || echo "vmr-init: wanted $want_disks disks / qga=$want_qga, have $(ls /sys/block)" >/dev/console

if [ "$want_qga" = 1 ] && [ -x /usr/sbin/qemu-ga ]; then
  port=$(ls /dev/vport*p* 2>/dev/null | head -n 1)
  if [ -n "$port" ]; then
    /usr/sbin/qemu-ga -m virtio-serial -p "$port" -t /run -f /run/qemu-ga.pid </dev/null >/run/qemu-ga.log 2>&1 &
  else
    echo "vmr-init: no virtio serial port for qemu-ga" >/dev/console
  fi
fi

exec </dev/ttyS0 >/dev/ttyS0 2>&1
stty -echo -onlcr -isig -ixon
dmesg -n 1
echo "@@READY"

while :; do
  line=""
  if ! read -r line; then
    sleep 0.1
    continue
  fi
  line="${line%$(printf '\r')}"
  [ -n "$line" ] || continue
  id="${line%% *}"
  cmd="${line#* }"
  [ "$cmd" = "$line" ] && cmd=""
  if [ "$line" = "@@POWEROFF" ] || [ "$cmd" = "@@POWEROFF" ]; then
    sync
    poweroff -f
  fi
  /bin/sh -c "$cmd" </dev/null >/tmp/vmr-out 2>&1
  rc=$?
  printf '@@BEGIN %s\n' "$id"
  cat /tmp/vmr-out
  printf '\n@@END %s %d\n' "$id" "$rc"
done
