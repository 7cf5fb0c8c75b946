#!/usr/bin/env bash
# Install pgvector for the PostgreSQL that Debian's `postgresql` package brought.
# Debian 12 (bookworm) ships no pgvector package; Debian 13 (trixie) has its source package
# `pgvector`, which builds against bookworm's postgresql-server-dev in seconds. Where the
# binary package exists (trixie and later), it is installed instead.
set -euo pipefail
PG_MAJOR=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if apt-get install -y -qq --no-install-recommends "postgresql-$PG_MAJOR-pgvector" >/dev/null 2>&1; then
    echo "pgvector: Debian package postgresql-$PG_MAJOR-pgvector"
    exit 0
fi
apt-get install -y -qq --no-install-recommends "postgresql-server-dev-$PG_MAJOR" build-essential >/dev/null
work=$(mktemp -d /tmp/masque-pgvector.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial"
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
    > "$work/sources.list"
apt_src=(-o Dir::Etc::sourcelist="$work/sources.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$work/lists"
         -o APT::Sandbox::User=root)
apt-get update -qq "${apt_src[@]}"
(cd "$work" && apt-get source --download-only -qq "${apt_src[@]}" pgvector >/dev/null 2>&1)
tar -xzf "$work"/pgvector_*.orig.tar.gz -C "$work"
make -s -C "$work"/pgvector-*/ PG_CONFIG="/usr/lib/postgresql/$PG_MAJOR/bin/pg_config" OPTFLAGS="" >/dev/null
make -s -C "$work"/pgvector-*/ PG_CONFIG="/usr/lib/postgresql/$PG_MAJOR/bin/pg_config" install >/dev/null
echo "pgvector: built from Debian's source package $(basename "$work"/pgvector_*.dsc .dsc) for PostgreSQL $PG_MAJOR"
