#!/usr/bin/env bash
# The main job on a built-in sample: make an image, mount it as a raw file, partition it,
# make a file system through a loop device, list it, unmount; then the partition as a file
# and the disk's hash.
set -euo pipefail
RAWMOUNT=${RAWMOUNT:-.build/release/rawmount}
RAWMOUNT=$(realpath "$RAWMOUNT")
work=$(mktemp -d /tmp/rawmount-demo.XXXXXX)
loop=""
cleanup() {
  set +e
  mountpoint -q "$work/fs" && umount "$work/fs"
  [ -n "$loop" ] && losetup -d "$loop"
  mountpoint -q "$work/mnt" && "$RAWMOUNT" unmount "$work/mnt"
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/mnt" "$work/fs"

step() { printf '\n== %s\n' "$*"; }

step "create a 256 MiB sample qcow2 disk image"
image="$work/sample.qcow2"
"$RAWMOUNT" create -f qcow2 "$image" 256M
"$RAWMOUNT" info "$image"

step "mount it: rawmount mount $image $work/mnt"
"$RAWMOUNT" mount "$image" "$work/mnt"
ls -l "$work/mnt"

step "partition the raw view (sfdisk) and look at it with fdisk"
printf 'label: gpt\n,128M,L\n,,L\n' | sfdisk -q "$work/mnt/sample.raw"
fdisk -l "$work/mnt/sample.raw"

step "loop device on partition 1, mkfs.ext4, mount, write, list"
# Offset and size from the partition table (partition nodes need udev, which containers lack).
read -r start sectors < <(partx -g -o START,SECTORS -n 1 "$work/mnt/sample.raw")
loop=$(losetup --show -f -o $((start * 512)) --sizelimit $((sectors * 512)) "$work/mnt/sample.raw")
mkfs.ext4 -q -L rawmount-demo "$loop"
mount "$loop" "$work/fs"
echo "hello from inside a disk image" > "$work/fs/hello.txt"
cp /etc/os-release "$work/fs/"
mkdir "$work/fs/docs"
ls -la "$work/fs"
cat "$work/fs/hello.txt"
df -h "$work/fs"
umount "$work/fs"
e2fsck -fn "$loop"
losetup -d "$loop"; loop=""

step "unmount (returns after the image is flushed and closed)"
"$RAWMOUNT" unmount "$work/mnt"

step "the partition table and file system are in the image itself (qemu-img is the oracle)"
qemu-img check "$image"
qemu-img convert -O raw "$image" "$work/check.raw"
fdisk -l "$work/check.raw" | sed -n '1,12p'
"$RAWMOUNT" info "$image"

step "mount again: each partition is a file of its own (no losetup offsets)"
"$RAWMOUNT" mount --read-only "$image" "$work/mnt"
ls -l "$work/mnt"
e2fsck -fn "$work/mnt/sample-p1.raw"
fls "$work/mnt/sample-p1.raw"
"$RAWMOUNT" unmount "$work/mnt"

step "hash the guest disk: rawmount hash, and sha256sum of qemu-img's raw output"
"$RAWMOUNT" hash "$image"
sha256sum "$work/check.raw"
echo
echo "demo finished: partitioned, formatted and listed a disk image through rawmount"
