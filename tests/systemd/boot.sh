#!/bin/bash
# Boot a real systemd as PID 1 on an overlay of this machine's root file system.
#
# Run as: unshare --fork --kill-child --pid --mount --uts --ipc --net --cgroup boot.sh WORKDIR [PATH...]
# from a process already moved into cgroups of its own (tests/systemdlab.py
# does both). Everything mounted here lives in the new mount namespace and goes
# when it does; writes land in a tmpfs, never on the machine's disk. Each PATH
# (the test's directory, the test's venv) is bound read-only at the same place
# inside: only the root mount is in the overlay, not what is mounted below it. Why
# pivot_root and not chroot: the kernel refuses user namespaces (the units'
# PrivateUsers=yes) to a chrooted process (shared/notes/systemd.md).
set -euo pipefail
W=$1
shift
R=$W/root
mount --make-rprivate /
mkdir -p "$W/ovl" "$R"
mount -t tmpfs -o mode=0755 tmpfs "$W/ovl"
mkdir "$W/ovl/upper" "$W/ovl/work"
mount -t overlay overlay -o "lowerdir=/,upperdir=$W/ovl/upper,workdir=$W/ovl/work" "$R"
for p in "$@"; do
  mkdir -p "$R$p"; mount --bind "$p" "$R$p"; mount -o remount,bind,ro "$R$p"
done
mount -t proc proc "$R/proc"
mount --bind "$R/proc/sys" "$R/proc/sys"
mount -o remount,bind,ro "$R/proc/sys"
mount -t sysfs -o ro sysfs "$R/sys"
mount -t tmpfs -o mode=0755 tmpfs "$R/sys/fs/cgroup"
for c in $(awk '$4 == 1 && $1 != "#subsys_name" {print $1}' /proc/cgroups); do
  if grep -qw "$c" /proc/self/cgroup; then
    mkdir "$R/sys/fs/cgroup/$c"; mount -t cgroup -o "$c" cgroup "$R/sys/fs/cgroup/$c"
  fi
done
mkdir "$R/sys/fs/cgroup/systemd"; mount -t cgroup -o none,name=systemd cgroup "$R/sys/fs/cgroup/systemd"
mkdir "$R/sys/fs/cgroup/unified"; mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup/unified"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$R/dev"
for d in null zero full random urandom tty; do touch "$R/dev/$d"; mount --bind "/dev/$d" "$R/dev/$d"; done
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
touch "$R/dev/console"; mount --bind /dev/null "$R/dev/console"
mount -t tmpfs -o mode=1777 tmpfs "$R/dev/shm"
mount -t tmpfs -o mode=0755 tmpfs "$R/run"
# Units that cannot work in a container (no kernel tunables, modules or ttys).
for u in systemd-sysctl.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount \
         systemd-modules-load.service getty@tty1.service console-getty.service; do
  ln -sf /dev/null "$R/etc/systemd/system/$u"
done
mkdir "$R/oldroot"
cd "$R"
pivot_root . oldroot
umount -l /oldroot
rmdir /oldroot
# basic.target, not multi-user.target: the machine's own enabled services
# (a Prometheus installed for another test, say) stay out of it.
exec env -i container=unshare /lib/systemd/systemd --system --unit=basic.target
