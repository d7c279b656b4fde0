#!/usr/bin/env bash
# Builds the binary packages of outbox_pg for every PostgreSQL major present (Debian's 15, and
# the server builds scripts/install-deps.sh cached under $PG_SERVERS):
#
#   target/package/postgresql-<major>-outbox-pg_<version>_amd64.deb
#   target/package/outbox_pg-<version>-pg<major>-linux-amd64.tar.gz   (+ install.sh inside)
#
#   scripts/package.sh [MAJOR...]     (default: every major present)
#
# PACKAGE_SOURCE=<dir> packages another source tree (the install test builds the previous
# release from git that way); PACKAGE_DIR=<dir> puts the packages elsewhere.
#
# The .deb lays the files out as Debian and PGDG packages do (/usr/lib/postgresql/<major>/lib,
# /usr/share/postgresql/<major>/extension) and depends on postgresql-<major>. The tarball holds
# the same files relative to `pg_config --pkglibdir` (lib/) and `--sharedir` (share/), with an
# install script for servers that are not Debian. Reproducible: timestamps come from the commit
# (SOURCE_DATE_EPOCH), owners are root, entries are sorted, compressors write no names or times.
set -euo pipefail
umask 022
repo="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$(mkdir -p "${PACKAGE_DIR:-$repo/target/package}" && cd "${PACKAGE_DIR:-$repo/target/package}" && pwd)"
cd "${PACKAGE_SOURCE:-$repo}"
export PATH="$HOME/.cargo/bin:$PATH"
shopt -s nullglob

SERVERS="${PG_SERVERS:-/opt/outbox_pg}"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}"

pg_config_of() {
    if [ "$1" = 15 ]; then echo /usr/bin/pg_config; else echo "$SERVERS/postgresql-$1/bin/pg_config"; fi
}

majors=("$@")
if [ ${#majors[@]} -eq 0 ]; then
    for major in 14 15 16 17 18; do
        [ -x "$(pg_config_of "$major")" ] && majors+=("$major")
    done
fi

mkdir -p "$OUT"
for major in "${majors[@]}"; do
    pg_config="$(pg_config_of "$major")"
    [ -x "$pg_config" ] || { echo "package: no PostgreSQL $major here (scripts/install-deps.sh $major)" >&2; exit 2; }
    echo "==> outbox_pg $VERSION for PostgreSQL $major"
    build="$OUT/build-pg$major"
    rm -rf "$build"
    cargo pgrx package --pg-config "$pg_config" --out-dir "$build" >/dev/null
    library="$(find "$build" -name outbox_pg.so | head -1)"
    control="$(find "$build" -name outbox_pg.control | head -1)"
    [ -n "$library" ] && [ -n "$control" ] || { echo "package: cargo pgrx package made no library" >&2; exit 1; }

    # The files, once: the library, the control file, every SQL script (the generated one for
    # this version, the frozen released ones and every upgrade).
    files="$OUT/files-pg$major"
    rm -rf "$files"
    mkdir -p "$files/lib" "$files/share/extension"
    install -m 0755 "$library" "$files/lib/outbox_pg.so"
    install -m 0644 "$control" "$files/share/extension/"
    for script in "$(dirname "$control")"/outbox_pg--*.sql sql/outbox_pg--*.sql sql/released/*.sql sql/upgrades/*.sql; do
        install -m 0644 "$script" "$files/share/extension/"
    done
    if [ -z "$(find "$files/share/extension" -name "outbox_pg--$VERSION.sql")" ]; then
        echo "package: no outbox_pg--$VERSION.sql was generated" >&2
        exit 1
    fi

    # Debian package.
    name="postgresql-$major-outbox-pg"
    deb_root="$OUT/deb-pg$major"
    rm -rf "$deb_root"
    mkdir -p "$deb_root/DEBIAN" "$deb_root/usr/lib/postgresql/$major/lib" \
             "$deb_root/usr/share/postgresql/$major/extension" "$deb_root/usr/share/doc/$name"
    cp -p "$files/lib/outbox_pg.so" "$deb_root/usr/lib/postgresql/$major/lib/"
    cp -p "$files/share/extension/"* "$deb_root/usr/share/postgresql/$major/extension/"
    install -m 0644 README.md "$deb_root/usr/share/doc/$name/README.md"
    printf 'outbox_pg %s\nLicense: Apache-2.0\n' "$VERSION" > "$deb_root/usr/share/doc/$name/copyright"
    # Shared-library dependencies (libc, libssl, zlib, libgcc) as dpkg-shlibdeps finds them.
    shlibs="$(cd "$OUT" && mkdir -p shlibdeps/debian && printf 'Source: outbox-pg\n\nPackage: %s\nArchitecture: any\n' "$name" > shlibdeps/debian/control \
              && cd shlibdeps && dpkg-shlibdeps -O "../deb-pg$major/usr/lib/postgresql/$major/lib/outbox_pg.so" 2>/dev/null \
              | sed -n 's/^shlibs:Depends=//p')"
    installed_kb="$(du -sk --apparent-size "$deb_root/usr" | cut -f1)"
    # Built against this minor's headers: older minors of the major are not promised to match.
    built="$("$pg_config" --version | sed -E 's/^PostgreSQL ([0-9]+\.[0-9]+).*/\1/')"
    cat > "$deb_root/DEBIAN/control" <<CONTROL
Package: $name
Version: $VERSION
Architecture: $(dpkg --print-architecture)
Maintainer: outbox_pg developers <outbox-pg@invalid>
Installed-Size: $installed_kb
Depends: postgresql-$major (>= $built)${shlibs:+, $shlibs}
Section: database
Priority: optional
Homepage: https://github.com/outbox-pg/outbox_pg
Description: transactional outbox for PostgreSQL $major, published to Kafka
 outbox.emit() writes an event in the caller's transaction; a background worker
 inside the server publishes committed events to Kafka with librdkafka.
 Needs shared_preload_libraries = 'outbox_pg' (a restart) and CREATE EXTENSION.
CONTROL
    find "$deb_root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
    deb="$OUT/${name}_${VERSION}_amd64.deb"
    dpkg-deb --root-owner-group -Zxz --build "$deb_root" "$deb" >/dev/null

    # Tarball for servers that are not Debian.
    tar_name="outbox_pg-$VERSION-pg$major-linux-amd64"
    tar_root="$OUT/$tar_name"
    rm -rf "$tar_root"
    mkdir -p "$tar_root"
    cp -rp "$files/lib" "$files/share" "$tar_root/"
    cat > "$tar_root/install.sh" <<INSTALL
#!/bin/sh
# Installs outbox_pg $VERSION for PostgreSQL $major into the server pg_config names:
#   ./install.sh [/path/to/pg_config]      (default: pg_config on PATH)
set -eu
here="\$(cd "\$(dirname "\$0")" && pwd)"
pg_config="\${1:-pg_config}"
major="\$("\$pg_config" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\\1/')"
if [ "\$major" != "$major" ]; then
    echo "install.sh: this build is for PostgreSQL $major; \$pg_config is PostgreSQL \$major" >&2
    exit 1
fi
lib="\$("\$pg_config" --pkglibdir)"
ext="\$("\$pg_config" --sharedir)/extension"
install -d "\$lib" "\$ext"
install -m 0755 "\$here/lib/outbox_pg.so" "\$lib/"
install -m 0644 "\$here"/share/extension/* "\$ext/"
echo "outbox_pg $VERSION installed into \$lib and \$ext."
echo "Add outbox_pg to shared_preload_libraries, restart the server, then CREATE EXTENSION outbox_pg."
INSTALL
    chmod 0755 "$tar_root/install.sh"
    find "$tar_root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
    tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
        -C "$OUT" -cf - "$tar_name" | gzip -n -9 > "$OUT/$tar_name.tar.gz"
    rm -rf "$build" "$files" "$deb_root" "$tar_root" "$OUT/shlibdeps"
    sha256sum "$deb" "$OUT/$tar_name.tar.gz"
done
