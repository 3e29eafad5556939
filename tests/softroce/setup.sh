#!/usr/bin/env bash
# tests/softroce/setup.sh -- install the Debian packages that Tessera's RDMA tests need.
#
#   tests/softroce/setup.sh            # install whatever is missing (as root, with apt)
#   tests/softroce/setup.sh --check    # only list what is missing; exit 1 if anything is
#
# tests/softroce/run.sh calls this before every boot, and the main test script should call it before
# building, so a fresh machine gets everything in one `apt-get install`. A warm machine never
# touches the network: each package is checked with dpkg first and `apt-get update` runs at most
# once, only when something has to be installed.
set -euo pipefail

# Every package, with the reason it is here. The guest boots on the host's own root filesystem,
# so the tools the guest runs are installed on the host.
PACKAGES=(
  # -- the VM itself (host side) --
  qemu-system-x86      # qemu-system-x86_64, the emulator (TCG here: no usable KVM)
  linux-image-amd64    # a kernel that ships rdma_rxe; booted in the guest, never on the host
  busybox-static       # the initramfs: mounts the 9p root and switches to it
  cpio                 # packs the initramfs
  kmod                 # modprobe: module dependency lists on the host, loading in the guest
  xz-utils             # unpacks the kernel image (and xz-compressed modules)
  iproute2             # ip (dummy netdev), rdma (rxe link), ss (perftest.sh waits on ports)
  # -- verbs userland, used inside the guest --
  rdma-core            # rdma_rxe helpers and udev rules
  ibverbs-providers    # librxe-rdmav*.so: the userspace half of the rxe device
  ibverbs-utils        # ibv_devinfo, ibv_rc_pingpong
  libibverbs-dev       # libibverbs.so (linking and run-time loading by the sideway crate)
  librdmacm-dev        # librdmacm.so, likewise
  rdmacm-utils         # rping
  perftest             # ib_write_lat and friends: the baseline Tessera is measured against
  # -- the disk baseline --
  fio                  # sequential O_DIRECT writes: what checkpoint throughput is measured against
  # -- building the RDMA transport (sideway / rdma-mummy-sys run bindgen and cmake) --
  cmake
  libclang-dev
  pkg-config
)

installed() {  # installed PACKAGE: true when dpkg has PACKAGE fully installed ("ii")
  [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" = "ii " ]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
  installed "$pkg" || missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "${1:-}" = --check ]; then
  echo "softroce setup: missing packages: ${missing[*]}" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "softroce setup: run as root, or install: apt-get install --no-install-recommends ${missing[*]}" >&2
  exit 1
fi

echo "softroce setup: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Other builds on this machine may hold the dpkg lock: wait for it instead of failing.
APT=(apt-get -o DPkg::Lock::Timeout=600 -qq)
"${APT[@]}" update >&2
"${APT[@]}" install -y --no-install-recommends "${missing[@]}" >&2

# The guest kernel image must be readable by whoever starts qemu (Ubuntu ships it 0600).
for k in /boot/vmlinuz-*; do
  [ -r "$k" ] || chmod 0644 "$k"
done
