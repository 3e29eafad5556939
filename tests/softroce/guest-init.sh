#!/bin/busybox sh
# tests/softroce/guest-init.sh -- PID 1 of the SoftRoCE guest's initramfs (stage 1 of 2).
#
# run.sh packs this file as /init, next to a static busybox and the few modules it needs to
# reach the host: virtio_pci, 9p and overlay. It turns the host's root filesystem (shared
# read-only over 9p as "hostroot") into a writable root with a throw-away tmpfs overlay, mounts
# the run directory (shared as "softroce-io") at /run/softroce, and hands over to stage 2,
# guest-run.sh, which sets up rxe0 and runs the command.
#
# A failure here is a setup failure: the reason goes to /run/softroce/setup-error and the exit
# code 125 to /run/softroce/rc (once the io share is mounted), and the guest powers off.
B=/bin/busybox
IO=/io   # where the io share lives until switch_root moves it

$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev

fail() {
  echo "softroce guest: $*"
  if [ -n "$IO_MOUNTED" ]; then
    echo "$*" > $IO/setup-error
    echo 125 > $IO/rc
  fi
  $B sync
  echo o > /proc/sysrq-trigger   # power off at once: qemu runs with -no-reboot and exits
  $B sleep 60
}

for m in $($B cat /mods/order); do
  $B insmod /mods/"$m" || echo "softroce guest: insmod $m failed"
done

# msize 512 KiB: fewer 9p round trips for large reads (binaries, test data) under emulation.
P9="trans=virtio,version=9p2000.L,msize=524288"
IO_MOUNTED=
$B mount -t 9p -o "$P9" softroce-io $IO || fail "cannot mount the io share (9p softroce-io)"
IO_MOUNTED=1
# Tells the host the kernel is up (run.sh boots again if this never appears).
: > $IO/booted
# cache=loose is safe for the root: it is read-only for the whole life of the guest.
$B mount -t 9p -o "$P9,ro,cache=loose" hostroot /lower || fail "cannot mount the host root (9p hostroot)"
$B mount -t tmpfs -o mode=0755 upper /rw
$B mkdir -p /rw/upper /rw/work
$B mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work root /newroot \
  || fail "cannot mount the overlay root (overlayfs on 9p)"

$B mount -t tmpfs -o mode=0755 run /newroot/run
$B mkdir -p /newroot/run/softroce
$B mount --move $IO /newroot/run/softroce
$B mount --move /dev /newroot/dev
$B mount --move /proc /newroot/proc
$B mount --move /sys /newroot/sys
exec $B switch_root /newroot /bin/bash /run/softroce/guest-run.sh
