# Sourced by runtime_check.sh and image_check.sh: the runtime base, made once
# from Debian's packages and cached under target/k8s-tools/:
#   $ROOTFS      Debian bookworm minbase (debootstrap) with no CA material,
#                like debian:bookworm-slim, the Dockerfile's runtime base;
#   $CA_BUNDLE   Debian's CA bundle (from the ca-certificates package), the
#                one file besides the binary that the Dockerfile adds.
ROOTFS=$TOOLS/rootfs-bookworm
CA_BUNDLE=$TOOLS/debian-ca-certificates.crt
if [ ! -e "$ROOTFS/.complete-v2" ] || [ ! -s "$CA_BUNDLE" ]; then
  command -v debootstrap >/dev/null || {
    echo "[rootfs] installing debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  }
  echo "[rootfs] debootstrap --variant=minbase bookworm into $ROOTFS (once)"
  rm -rf "$ROOTFS.tmp"
  debootstrap --variant=minbase --include=ca-certificates bookworm "$ROOTFS.tmp" \
    >"$TOOLS/debootstrap.log" 2>&1 || { tail -5 "$TOOLS/debootstrap.log"; echo "[rootfs] FAIL: debootstrap" >&2; exit 1; }
  cp "$ROOTFS.tmp/etc/ssl/certs/ca-certificates.crt" "$CA_BUNDLE"
  # Then without it, as slim comes: no CA bundle, no certificate directory.
  chroot "$ROOTFS.tmp" dpkg --purge ca-certificates >>"$TOOLS/debootstrap.log" 2>&1
  rm -rf "$ROOTFS.tmp/etc/ssl/certs" "$ROOTFS.tmp/usr/share/ca-certificates"
  rm -rf "$ROOTFS"; mv "$ROOTFS.tmp" "$ROOTFS"; touch "$ROOTFS/.complete-v2"
fi
