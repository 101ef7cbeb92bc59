#!/bin/sh
# make deb: a Debian package of the installed tree (binary, nbdkit plugin, man page,
# completions) built from BIN (the static-stdlib release binary), with Depends worked out
# from the libraries the binary and the plugin actually load (dpkg -S of each), so the
# package installs on a Debian 12 without Swift.
set -eu
BIN=${BIN:?BIN names the release binary}
OUT=${OUT:-.build}
ARCH=$(dpkg --print-architecture)
VERSION=${VERSION:-0.$(git log -1 --format=%cd --date=format:%Y%m%d 2>/dev/null || date +%Y%m%d)+git$(git rev-parse --short HEAD 2>/dev/null || echo local)}
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
make --no-print-directory install DESTDIR="$STAGE" PREFIX=/usr BIN="$BIN" >/dev/null

# The binary must load only Debian's libraries (the Swift runtime linked in); the plugin's
# Swift runtime libraries are installed beside it (make install), the rest are Debian's.
outside=$(ldd "$BIN" | awk '/=>/ {print $3}' | grep -v '^/lib/\|^/usr/lib/' || true)
if [ -n "$outside" ]; then
  echo "deb: the binary loads libraries from outside Debian (build it with make release):" >&2
  echo "$outside" >&2
  exit 1
fi
for l in $(ldd "$(dirname "$BIN")/librawmount-nbdkit.so" | awk '/=>/ {print $3}' | grep -v '^/lib/\|^/usr/lib/'); do
  [ -f "$STAGE/usr/lib/rawmount/$(basename "$l")" ] || { echo "deb: $l is not installed beside the plugin" >&2; exit 1; }
done
libs=$(ldd "$BIN" "$(dirname "$BIN")/librawmount-nbdkit.so" | awk '/=>/ {print $3}' | grep '^/lib/\|^/usr/lib/' | sort -u)
depends=$(for l in $libs; do dpkg -S "$(readlink -f "$l")" 2>/dev/null || dpkg -S "$l"; done \
  | cut -d: -f1 | sort -u | tr '\n' ' ' | sed 's/ $//; s/ /, /g')

# Symbols are for debugging builds, not for the package (96 MB -> 64 MB for the binary).
strip --strip-unneeded "$STAGE/usr/bin/rawmount" "$STAGE/usr/lib/rawmount/librawmount-nbdkit.so"
mkdir -p "$STAGE/DEBIAN"
cat > "$STAGE/DEBIAN/control" <<CONTROL
Package: rawmount
Version: $VERSION
Architecture: $ARCH
Maintainer: the rawmount developers <rawmount@localhost>
Depends: fuse3, $depends
Recommends: nbdkit, bash-completion
Suggests: qemu-utils, ewf-tools
Section: admin
Priority: optional
Installed-Size: $(du -sk "$STAGE/usr" | cut -f1)
Description: virtual disk images (qcow2, VMDK, VHD/VHDX, VDI, QED, Bochs, EWF) as raw files
 rawmount shows a disk image as a plain raw file through FUSE: fdisk, dd, losetup,
 mount -o loop, mkfs and sleuthkit work on it, and writes land in the image in its own
 format. Also: info, check, map, convert, create, hash, verify, bitmap and an nbdkit plugin.
CONTROL
deb="$OUT/rawmount_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group --build "$STAGE" "$deb" >/dev/null
echo "$deb"
