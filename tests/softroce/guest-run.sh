#!/bin/bash
# tests/softroce/guest-run.sh -- stage 2 of the SoftRoCE guest, PID 1 after switch_root.
#
# Runs on the host's own filesystem (9p + tmpfs overlay, see guest-init.sh). It creates the rxe
# device, checks that user space can use it, then runs the command with the caller's cwd and
# environment, as root, with unlimited locked memory. Everything it needs from the host is in
# /run/softroce (the io share, a per-run directory on the host):
#   params        bash assignments written by run.sh: CMD (array), CWD, NETDEV, RXE_NETDEV, IP,
#                 MTU, RW_DIRS, ACCEL, CRC32_PCLMUL
#   env           the caller's environment, NUL-separated (`env -0`)
# and what it hands back:
#   stdout stderr the command's output, streamed to the caller while it runs
#   rc            the command's exit code, or 125 if the setup failed
#   setup-error   one line saying which setup step failed and why
# Its own log (and the kernel's) goes to the serial console, kept by run.sh as console.log.
IO=/run/softroce
exec > /dev/ttyS0 2>&1 < /dev/null
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

finish() {  # finish RC: report RC to the host and power off (qemu exits: -no-reboot)
  echo "$1" > $IO/rc
  sync
  echo o > /proc/sysrq-trigger
  sleep 60
}
fail() {  # fail MESSAGE: a setup step failed -- never run the command without a working rxe0
  echo "softroce guest: $*"
  echo "$*" > $IO/setup-error
  dmesg | tail -n 15
  finish 125
}
step() {  # step WHAT COMMAND...: run COMMAND; on failure fail with WHAT and COMMAND's own error
  local what=$1 out; shift
  out=$("$@" 2>&1) || fail "$what: \`$*\` failed: ${out:-no output}"
  [ -z "$out" ] || echo "$out"
}

# --- the usual pseudo filesystems a program expects -----------------------------------------
mkdir -p /dev/pts /dev/shm
mount -t devpts -o ptmxmode=0666,mode=0620 devpts /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
ln -sfn /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
hostname softroce-vm

# shellcheck source=/dev/null
source $IO/params || fail "cannot read $IO/params"

# --- host directories the command may write to (SOFTROCE_RW_DIRS) ------------------------------
# run.sh shares the i-th directory as "softroce-rw<i>"; mount it over the same path.
IFS=: read -r -a rw_dirs <<< "$RW_DIRS"
i=0
for d in "${rw_dirs[@]}"; do
  [ -n "$d" ] || continue
  i=$((i + 1))
  mkdir -p "$d"
  step "writable dir $d" mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 "softroce-rw$i" "$d"
done

# --- the rxe device -----------------------------------------------------------------------------
# A dummy netdev that exists only in this guest carries rxe0: the guest has no NIC at all, so
# RoCE traffic loops back inside the guest kernel and nothing can leave the VM.
# rxe checksums every packet (its ICRC) with the kernel's "crc32". The PCLMUL version takes any
# span of 79 bytes or more, inside kernel_fpu_begin/end: the FPU state saved and restored, which
# under TCG cost about 1.5 us a call in write_floor (one way, 72 B 11.4 us, 80 B 13.0, 104 B
# 14.4). A payload that crosses 79 bytes pays it twice a packet, a cliff no real HCA has (it
# computes the ICRC in hardware). Under TCG the guest keeps to the generic table-driven crc32;
# SOFTROCE_CRC32_PCLMUL=1 lets the PCLMUL one load.
if [ "$ACCEL" = tcg ] && [ "$CRC32_PCLMUL" != 1 ]; then
  echo "blacklist crc32_pclmul" > /etc/modprobe.d/softroce-crc32.conf
fi
step "loading the RDMA modules" modprobe -a rdma_rxe ib_uverbs rdma_ucm dummy
ip link set lo up
step "creating netdev $NETDEV" ip link add "$NETDEV" type dummy
if [ -n "$MTU" ]; then
  step "setting MTU $MTU on $NETDEV" ip link set "$NETDEV" mtu "$MTU"
fi
step "adding $IP/24 to $NETDEV" ip addr add "$IP/24" dev "$NETDEV"
step "bringing up $NETDEV" ip link set "$NETDEV" up
step "creating the rxe device rxe0 on netdev $RXE_NETDEV" rdma link add rxe0 type rxe netdev "$RXE_NETDEV"

# The device node and the IPv4 GID appear asynchronously. Wait (5 s at most) for both: GID
# index 1 must be the RoCEv2 GID of $IP, because that is what RDMA_GID_INDEX=1 promises.
port=/sys/class/infiniband/rxe0/ports/1
want_gid=$(printf '0000:0000:0000:0000:0000:ffff:%02x%02x:%02x%02x' ${IP//./ })
for _ in $(seq 50); do
  if [ -e /dev/infiniband/uverbs0 ] && [ "$(cat $port/gids/1 2>/dev/null)" = "$want_gid" ]; then
    break
  fi
  sleep 0.1
done
[ -e /dev/infiniband/uverbs0 ] || fail "rxe0 has no /dev/infiniband/uverbs0 (is ib_uverbs loaded?)"
gid1=$(cat $port/gids/1 2>/dev/null)
type1=$(cat $port/gid_attrs/types/1 2>/dev/null)
[ "$gid1" = "$want_gid" ] && [ "$type1" = "RoCE v2" ] \
  || fail "rxe0 GID index 1 is '$gid1' ($type1), expected $want_gid (RoCE v2) for $IP"
# Opening the device from user space proves that the provider library (librxe) is installed.
step "opening rxe0 from user space (ibverbs-providers)" ibv_devinfo -d rxe0
rdma link show

# --- the command ----------------------------------------------------------------------------------
ulimit -l unlimited   # memory registration pins pages
ulimit -n 65536 2>/dev/null || true
while IFS= read -r -d '' kv; do
  name=${kv%%=*}
  [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue   # skips exported bash functions too
  case $name in PWD|OLDPWD|SHLVL|_) continue ;; esac
  export "$kv"
done < $IO/env
# The device this guest has, whatever the caller's environment said.
export SOFTROCE_VM=1 RDMA_DEV=rxe0 RDMA_IP="$IP" RDMA_GID_INDEX=1 SOFTROCE_ACCEL="$ACCEL"
cd "$CWD" || fail "cannot enter the working directory $CWD in the guest"

echo "softroce guest: running: ${CMD[*]}"
"${CMD[@]}" > $IO/stdout 2> $IO/stderr
finish $?
