#!/usr/bin/env bash
# tests/softroce/run.sh -- run one command on a real SoftRoCE device, inside a throw-away VM.
#
#   tests/softroce/run.sh COMMAND [ARGS...]
#   tests/softroce/run.sh ibv_devinfo -d rxe0
#   CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$PWD/tests/softroce/run.sh cargo test -p tessera-transport
#
# This machine's kernel has no RDMA and cannot load modules, so the command runs in a qemu guest
# that boots Debian's kernel (which ships rdma_rxe) on the HOST's root filesystem: shared
# read-only over 9p with a throw-away tmpfs overlay on top, so a binary built on the host runs
# unchanged at the same path. In the guest (see guest-init.sh, then guest-run.sh):
#   * rdma_rxe, ib_uverbs and rdma_ucm are loaded (libibverbs and librdmacm both work);
#   * rxe0 sits on a dummy netdev with $SOFTROCE_IP/24. The guest has no NIC (-nic none):
#     nothing leaves the VM, and every process in the guest talks over the same rxe0;
#   * the command runs as root, in the caller's cwd, with the caller's environment,
#     `ulimit -l unlimited`, and SOFTROCE_VM=1 RDMA_DEV=rxe0 RDMA_IP=<ip> RDMA_GID_INDEX=1
#     (index 1 is the RoCEv2 GID of the IPv4 address; index 0 is the link-local one) and
#     SOFTROCE_ACCEL=tcg|kvm (how the guest's CPU runs: emulated or not);
#   * the command's stdout and stderr come back separately, streamed while it runs.
# Anything the command writes is thrown away with the VM, except under SOFTROCE_RW_DIRS.
#
# Exit code: the command's; 124 if the VM hit SOFTROCE_TIMEOUT; 125 if the VM or the RDMA setup
# failed -- in particular if rxe0 cannot be created. There is no "skip": no device, no pass.
#
# Tunables (environment):
#   SOFTROCE_TIMEOUT   wall-clock limit for the whole VM, seconds (default 1800)
#   SOFTROCE_BOOT_TIMEOUT  seconds a boot may take to reach the guest's init (default 180); a
#                      boot that does not is killed and tried once more (an emulated boot hung
#                      once, silently, in about forty)
#   SOFTROCE_MEM       guest RAM (default 2G)
#   SOFTROCE_CPUS      guest vCPUs (default: the host's, at most 4)
#   SOFTROCE_MTU       MTU of the guest netdev; rxe's path MTU follows it, rounded down to an
#                      IB MTU (default 1500 -> 1024; 4200 or more -> 4096)
#   SOFTROCE_RW_DIRS   colon-separated host directories the guest may write (mounted live at the
#                      same path; e.g. the cargo target dir to keep results). No commas in paths.
#   SOFTROCE_IP        IPv4 address of the guest netdev (default 10.77.0.1, a /24)
#   SOFTROCE_NETDEV    name of the guest's dummy netdev (default rxenet0)
#   SOFTROCE_RXE_NETDEV  netdev rxe0 is bound to (default $SOFTROCE_NETDEV). Naming one that does
#                      not exist is how the failure path is tested: the run must end with 125.
#   SOFTROCE_PASS_ENV  1 (default): pass the caller's environment into the guest; 0: don't
#   SOFTROCE_KVER      guest kernel version (default: the newest with rdma_rxe and /boot/vmlinuz-*)
#   SOFTROCE_ACCEL     auto (default), kvm or tcg. auto picks kvm only if /dev/kvm is usable and
#                      the CPU has vmx/svm; this machine has neither, so TCG emulation it is.
#   SOFTROCE_CRC32_PCLMUL  1: under TCG, let rxe checksum with the kernel's PCLMUL crc32 (by
#                      default the guest keeps to the generic one; see guest-run.sh)
#   SOFTROCE_CPU       the CPU model qemu emulates under TCG (default max,-erms,-fsrm; see below)
#   SOFTROCE_CACHE_DIR where the unpacked kernel is cached (default ~/.cache/tessera-softroce)
#   SOFTROCE_VERBOSE   1: print the guest console (kernel log, setup steps) to stderr at the end
#   SOFTROCE_KEEP      1: keep the run directory (console log, initramfs) and print its path
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
say() { echo "softroce: $*" >&2; }
die() { say "$*"; exit 125; }

[ "${1:-}" = -- ] && shift
[ $# -ge 1 ] || die "usage: $0 COMMAND [ARGS...]"

TIMEOUT_S=${SOFTROCE_TIMEOUT:-1800}
BOOT_TIMEOUT_S=${SOFTROCE_BOOT_TIMEOUT:-180}
MEM=${SOFTROCE_MEM:-2G}
HOST_CPUS=$(nproc)
CPUS=${SOFTROCE_CPUS:-$((HOST_CPUS < 4 ? HOST_CPUS : 4))}
MTU=${SOFTROCE_MTU:-}
IP=${SOFTROCE_IP:-10.77.0.1}
NETDEV=${SOFTROCE_NETDEV:-rxenet0}
RXE_NETDEV=${SOFTROCE_RXE_NETDEV:-$NETDEV}
RW_DIRS=${SOFTROCE_RW_DIRS:-}
[[ $IP =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || die "SOFTROCE_IP must be an IPv4 address, not '$IP'"

# --- packages: installs what is missing (as root), or says what to install ---------------------
"$HERE/setup.sh" || die "missing packages (see above): run tests/softroce/setup.sh as root"

# --- the guest kernel: one that ships rdma_rxe ------------------------------------------------------
KVER=${SOFTROCE_KVER:-}
if [ -z "$KVER" ]; then
  for v in $(ls -1 /lib/modules 2>/dev/null | sort -V -r); do
    if [ -e "/boot/vmlinuz-$v" ] && compgen -G "/lib/modules/$v/kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko*" >/dev/null; then
      KVER=$v
      break
    fi
  done
fi
[ -n "$KVER" ] || die "no kernel with rdma_rxe in /lib/modules (apt-get install linux-image-amd64)"
VMLINUZ=/boot/vmlinuz-$KVER
[ -r "$VMLINUZ" ] || die "$VMLINUZ is not readable (chmod 0644 $VMLINUZ)"
BUSYBOX=/bin/busybox
{ [ -x $BUSYBOX ] && ! ldd $BUSYBOX >/dev/null 2>&1; } || die "$BUSYBOX must be static (apt-get install busybox-static)"

# --- accelerator ------------------------------------------------------------------------------
ACCEL=${SOFTROCE_ACCEL:-auto}
if [ "$ACCEL" = auto ]; then
  if [ -r /dev/kvm ] && [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; then ACCEL=kvm; else ACCEL=tcg; fi
fi
# Under TCG the CPU is `max` without ERMS and FSRM. With them, the guest kernel clears and copies
# with `rep stosb`/`rep movsb` (every skb rxe allocates, every packet it copies) and glibc's memcpy
# copies with `rep movsb` from 2 KiB up, and TCG runs those one byte per pass through a translated
# block: a 64 KiB memcpy took 213 us against 19 us with glibc's vector loop (tcg-probe.c), and
# perftest's own 8 B ib_write_lat read 11.3 us against 9.4 us without them. Without them the kernel
# uses `rep stosq`/`rep movsq` and glibc its vector loops, closer to what a real CPU pays.
case $ACCEL in
  kvm) ACCEL_ARGS=(-accel kvm -cpu host) ;;
  tcg) ACCEL_ARGS=(-accel tcg,thread=multi -cpu "${SOFTROCE_CPU:-max,-erms,-fsrm}") ;;
  *) die "SOFTROCE_ACCEL must be auto, kvm or tcg, not '$ACCEL'" ;;
esac

# --- the run directory: initramfs, console log, and the io share ------------------------------------
RUN=$(mktemp -d "${TMPDIR:-/tmp}/tessera-softroce.XXXXXX")
IO=$RUN/io
mkdir -p "$IO"
qemu_pid=
tail_pids=()
cleanup() {
  [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null && wait "$qemu_pid" 2>/dev/null
  for p in "${tail_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ "${SOFTROCE_KEEP:-0}" = 1 ]; then say "kept $RUN"; else rm -rf "$RUN"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# --- the kernel image -------------------------------------------------------------------------
# Debian's kernel supports PVH, so qemu can boot the uncompressed ELF vmlinux directly. Under TCG
# that skips the emulated BIOS loader and the in-guest xz decompression: seconds per boot. The
# vmlinux is unpacked from the bzImage once and cached; a failure only costs the fallback.
unpack_vmlinux() {  # unpack_vmlinux BZIMAGE OUT: find the compressed payload by its magic
  local magic unpack offset
  for pair in '\xfd7zXZ\x00:xz -dc' '\x28\xb5\x2f\xfd:zstd -dc' '\x1f\x8b\x08:gzip -dc'; do
    magic=${pair%%:*}
    unpack=${pair#*:}
    for offset in $(LC_ALL=C grep -obUaP "$magic" "$1" 2>/dev/null | cut -d: -f1 | head -n 8); do
      tail -c +$((offset + 1)) "$1" | $unpack > "$2" 2>/dev/null
      [ "$(head -c 4 "$2" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] && return 0  # "\x7fELF"
    done
  done
  return 1
}
KERNEL=$VMLINUZ
if grep -q '^CONFIG_PVH=y' "/boot/config-$KVER" 2>/dev/null; then
  CACHE=${SOFTROCE_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/tessera-softroce}
  mkdir -p "$CACHE" 2>/dev/null && [ -w "$CACHE" ] || CACHE=$RUN
  VMLINUX=$CACHE/vmlinux-$KVER
  if [ ! -s "$VMLINUX" ] || [ "$VMLINUX" -ot "$VMLINUZ" ]; then
    partial=$(mktemp "$VMLINUX.XXXXXX")   # concurrent runs each unpack; mv makes it atomic
    if unpack_vmlinux "$VMLINUZ" "$partial"; then mv -f "$partial" "$VMLINUX"; else rm -f "$partial"; fi
  fi
  [ -s "$VMLINUX" ] && KERNEL=$VMLINUX
fi

# --- the initramfs: busybox, stage 1, and the modules that reach the host's filesystem -------------
IR=$RUN/initramfs
mkdir -p "$IR"/{bin,dev,proc,sys,io,lower,rw,newroot,mods}
cp $BUSYBOX "$IR/bin/busybox"
cp "$HERE/guest-init.sh" "$IR/init"
for m in virtio_pci 9pnet_virtio 9p overlay; do
  modprobe -S "$KVER" --show-depends "$m" || die "module $m not found for kernel $KVER"
done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }' > "$RUN/modules"
while read -r ko; do
  name=$(basename "$ko")
  case $name in
    *.ko.xz) xz -dc "$ko" > "$IR/mods/${name%.xz}"; name=${name%.xz} ;;
    *.ko.zst) zstd -qdc "$ko" > "$IR/mods/${name%.zst}"; name=${name%.zst} ;;
    *) cp "$ko" "$IR/mods/$name" ;;
  esac
  echo "$name" >> "$IR/mods/order"
done < "$RUN/modules"
(cd "$IR" && find . | cpio -o -H newc --quiet | gzip -1) > "$RUN/initramfs.gz"

# --- what the guest runs: stage 2, the command, its cwd and environment --------------------------
cp "$HERE/guest-run.sh" "$IO/guest-run.sh"
CMD=("$@")
CWD=$PWD
{
  declare -p CMD CWD   # quote-safe for any argument
  printf 'NETDEV=%q RXE_NETDEV=%q IP=%q MTU=%q RW_DIRS=%q ACCEL=%q CRC32_PCLMUL=%q\n' \
    "$NETDEV" "$RXE_NETDEV" "$IP" "$MTU" "$RW_DIRS" "$ACCEL" "${SOFTROCE_CRC32_PCLMUL:-0}"
} > "$IO/params"
if [ "${SOFTROCE_PASS_ENV:-1}" = 1 ]; then env -0 > "$IO/env"; else : > "$IO/env"; fi
: > "$IO/stdout"
: > "$IO/stderr"

# --- boot -------------------------------------------------------------------------------------------
# Console options: quiet, no keyboard/mouse probing, one UART, power off (not reboot) on panic.
# tsc=reliable: the kernel would distrust the emulated TSCs and read the clock from the HPET, about
# 0.9 us a read instead of 0.12 us; QEMU derives all vCPUs' TSCs from one host clock.
APPEND="console=ttyS0 quiet loglevel=4 panic=-1 oops=panic mitigations=off tsc=reliable rdinit=/init"
APPEND+=" i8042.noaux i8042.nokbd i8042.nopnp 8250.nr_uarts=1"
QEMU=(qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot
  "${ACCEL_ARGS[@]}" -smp "$CPUS" -m "$MEM" -nic none
  -kernel "$KERNEL" -initrd "$RUN/initramfs.gz" -append "$APPEND"
  -serial "file:$RUN/console.log"
  -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
  -virtfs "local,path=$IO,mount_tag=softroce-io,security_model=none,multidevs=remap")
i=0
IFS=: read -r -a rw_dirs <<< "$RW_DIRS"
for d in "${rw_dirs[@]}"; do
  [ -n "$d" ] || continue
  [ -d "$d" ] || die "SOFTROCE_RW_DIRS: $d is not a directory"
  [[ $d != *,* ]] || die "SOFTROCE_RW_DIRS: $d contains a comma, which qemu's -virtfs cannot take"
  i=$((i + 1))
  QEMU+=(-virtfs "local,path=$d,mount_tag=softroce-rw$i,security_model=none,multidevs=remap")
done

start_ms=$(date +%s%3N)
for attempt in 1 2; do
  rm -f "$IO/booted"
  timeout -k 10 "$TIMEOUT_S" "${QEMU[@]}" > "$RUN/qemu.log" 2>&1 &
  qemu_pid=$!
  # The guest's init marks the io share as soon as it has mounted it.
  waited=0
  while [ ! -e "$IO/booted" ] && kill -0 $qemu_pid 2>/dev/null && [ $waited -lt "$BOOT_TIMEOUT_S" ]; do
    sleep 1
    waited=$((waited + 1))
  done
  if [ -e "$IO/booted" ] || ! kill -0 $qemu_pid 2>/dev/null || [ $attempt = 2 ]; then
    break
  fi
  say "the guest did not reach its init in ${BOOT_TIMEOUT_S}s (attempt $attempt); killing it and booting again"
  tail -n 5 "$RUN/console.log" >&2 || true
  kill $qemu_pid 2>/dev/null || true
  wait $qemu_pid 2>/dev/null || true
done
# Stream the command's output while it runs; each tail exits once qemu has.
tail -n +1 -q -f --pid=$qemu_pid "$IO/stdout" &
tail_pids+=($!)
tail -n +1 -q -f --pid=$qemu_pid "$IO/stderr" >&2 &
tail_pids+=($!)
qemu_rc=0
wait $qemu_pid || qemu_rc=$?
qemu_pid=
wait "${tail_pids[@]}" || true
tail_pids=()
elapsed_ms=$(($(date +%s%3N) - start_ms))

# --- verdict ----------------------------------------------------------------------------------
if [ "${SOFTROCE_VERBOSE:-0}" = 1 ]; then
  say "guest console ($ACCEL, $KERNEL, ${elapsed_ms} ms):"
  cat "$RUN/console.log" >&2
fi
if [ "$qemu_rc" = 124 ] || [ "$qemu_rc" = 137 ]; then
  say "timed out after ${TIMEOUT_S}s (SOFTROCE_TIMEOUT); last console lines:"
  tail -n 20 "$RUN/console.log" >&2
  exit 124
fi
if [ -s "$IO/setup-error" ]; then
  die "setup failed in the guest, the command did not run: $(cat "$IO/setup-error")" \
    "(SOFTROCE_VERBOSE=1 shows the guest console)"
fi
if [ ! -s "$IO/rc" ]; then
  say "the guest ended without reporting an exit code (qemu exit code $qemu_rc):"
  cat "$RUN/qemu.log" >&2
  tail -n 30 "$RUN/console.log" >&2
  exit 125
fi
exit "$(cat "$IO/rc")"
