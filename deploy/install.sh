#!/bin/sh
# Installs tlshub from a directory made by `cargo xtask dist` (this script
# sits at its top): binaries, systemd units, example configurations, the
# kTLS module load at boot, docs. Existing configuration files are never
# overwritten.
#
#   sudo ./install.sh                 install into / (prefix /usr/local)
#   sudo ./install.sh --uninstall     stop, detach the BPF programs, remove
#                                     binaries and units (keeps /etc/tlshub)
#   ./install.sh --root DIR           install into DIR (packaging, images)
#   ./install.sh --help
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=""
prefix=/usr/local
uninstall=no

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case "$1" in
    --root) [ $# -ge 2 ] || die "--root needs a directory"; root=$2; shift 2 ;;
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
    --uninstall) uninstall=yes; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done

binaries="tlshub-core tlshubctl tlshub-provider-openssl tlshub-provider-boringssl tlshub-provider-tlshub"
units="tlshub-core.service tlshub-core-release.service tlshub-provider@.service"
bindir=$root$prefix/bin
unitdir=$root/etc/systemd/system
docdir=$root$prefix/share/doc/tlshub
live=no
if [ -z "$root" ]; then
    [ "$(id -u)" = 0 ] || die "run as root (or give --root DIR)"
    [ -d /run/systemd/system ] && live=yes
fi

if [ "$uninstall" = yes ]; then
    if [ "$live" = yes ]; then
        systemctl disable --now tlshub-core.service || true
        for u in $(systemctl list-units --all --plain --no-legend 'tlshub-provider@*' | awk '{print $1}'); do
            systemctl disable --now "$u" || true
        done
        systemctl stop tlshub-core-release.service 2>/dev/null || true
    fi
    if [ -z "$root" ] && [ -x "$bindir/tlshub-core" ] && [ -f /etc/tlshub/core.toml ]; then
        "$bindir/tlshub-core" --config /etc/tlshub/core.toml release --detach ||
            echo "install.sh: release --detach failed; pins stay under the core's [bpf] pin_dir" >&2
    fi
    for b in $binaries; do rm -f "$bindir/$b"; done
    for u in $units; do rm -f "$unitdir/$u"; done
    rm -rf "$unitdir/tlshub-provider@tlshub.service.d" "$docdir"
    rm -f "$root/etc/modules-load.d/tlshub.conf"
    [ "$live" = yes ] && systemctl daemon-reload
    echo "tlshub removed; configuration kept in $root/etc/tlshub"
    exit 0
fi

for b in $binaries; do
    [ -f "$here/bin/$b" ] || die "$here/bin/$b missing: run this from a directory made by 'cargo xtask dist'"
done

# Shared libraries the binaries need (OpenSSL's libssl3 for the OpenSSL
# provider) must be there before anything starts.
if [ -z "$root" ] && command -v ldd >/dev/null; then
    missing=$(for b in $binaries; do ldd "$here/bin/$b" | grep 'not found' || true; done | awk '{print $1}' | sort -u)
    [ -z "$missing" ] || die "missing shared libraries: $missing (on Debian: apt install libssl3)"
fi

install -d -m 0755 "$bindir" "$unitdir" "$unitdir/tlshub-provider@tlshub.service.d" "$docdir" "$root/etc/modules-load.d"
for b in $binaries; do
    install -m 0755 "$here/bin/$b" "$bindir/$b"
done
for u in $units; do
    # The units name /usr/local/bin; another prefix is written into them.
    sed "s#/usr/local/#$prefix/#g" "$here/systemd/$u" >"$unitdir/$u"
    chmod 0644 "$unitdir/$u"
done
install -m 0644 "$here/systemd/tlshub-provider@tlshub.service.d/capabilities.conf" \
    "$unitdir/tlshub-provider@tlshub.service.d/capabilities.conf"
install -m 0644 "$here/modules-load.conf" "$root/etc/modules-load.d/tlshub.conf"
for d in "$here"/doc/*; do
    install -m 0644 "$d" "$docdir/"
done
install -d -m 0755 "$docdir/grafana"
install -m 0644 "$here"/grafana/*.json "$docdir/grafana/"

# Configuration: examples always, the live files only if absent.
install -d -m 0755 "$root/etc/tlshub"
install -d -m 0700 "$root/etc/tlshub/certs"
for c in "$here"/config/*.toml; do
    name=$(basename "$c")
    install -m 0644 "$c" "$root/etc/tlshub/$name.example"
    if [ -e "$root/etc/tlshub/$name" ]; then
        echo "kept $root/etc/tlshub/$name (new example: $name.example)"
    else
        install -m 0644 "$c" "$root/etc/tlshub/$name"
    fi
done

if [ "$live" = yes ]; then
    systemctl daemon-reload
fi
if [ -z "$root" ]; then
    # What the host must offer; say so now rather than at the first connection.
    modprobe tls 2>/dev/null || true
    if ! report=$("$bindir/tlshub-core" --config /etc/tlshub/core.toml check 2>&1); then
        echo "warning: this host cannot run tlshub-core as it is ('tlshub-core check' says):" >&2
        echo "$report" | grep -A1 '^MISSING' >&2
    fi
fi

cat <<EOF
tlshub installed: binaries in $bindir, units in $unitdir, configuration in $root/etc/tlshub.
Next:
  1. put the cluster CA and this node's certificate and key in /etc/tlshub/certs
     (ca.pem, node.pem, node.key), and edit /etc/tlshub/core.toml (node_name, [policy]);
  2. systemctl enable --now tlshub-provider@openssl.service tlshub-core.service
  3. tlshubctl status
EOF
