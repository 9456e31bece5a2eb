#!/usr/bin/env bash
# Builds the Debian package: OUTDIR/cadenza_<version>_<arch>.deb, with cadenza in a virtualenv of
# its own under /opt/venvs/cadenza (dh-virtualenv; see packaging/README.md).
#
#   bash packaging/build-deb.sh [OUTDIR]        # default OUTDIR: dist/ in the repository
#
# On Debian 12.  Installs the missing build dependencies with apt (that part needs root); the
# build itself runs in a temporary copy of the sources, so the work tree gets nothing but the .deb.
set -euo pipefail
# Debian's tools and Python only: never a pyenv shim or an activated venv.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset VIRTUAL_ENV PYTHONPATH PYTHONHOME PYTHONSTARTUP PIP_REQUIRE_VIRTUALENV PIP_USER

repo=$(cd "$(dirname "$0")/.." && pwd)
outdir=${1:-$repo/dist}

build_deps=(debhelper dh-virtualenv python3-venv python3-dev libsystemd-dev pkg-config gcc dpkg-dev fakeroot)
missing=()
for p in "${build_deps[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "build-deb: installing build dependencies: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's version of the Python one: 0.1.0 -> 0.1.0, 0.2.0rc1 -> 0.2.0~rc1 (sorts before 0.2.0).
version=$(/usr/bin/python3 - "$repo/pyproject.toml" <<'EOF'
import re, sys, tomllib
v = tomllib.load(open(sys.argv[1], "rb"))["project"]["version"]
print(re.sub(r"\.?(a|b|rc|dev)(\d*)", r"~\1\2", v))
EOF
)

work=$(mktemp -d /tmp/cadenza-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
src=$work/cadenza-$version
mkdir "$src"
# What the package is built from; packaging/debian becomes debian/ of the copy.
tar -C "$repo" --exclude=__pycache__ --exclude='*.egg-info' -cf - \
    pyproject.toml README.md src units packaging | tar -C "$src" -xf -
cp -a "$repo/packaging/debian" "$src/debian"
# The changelog is generated so the version has one source, pyproject.toml.  Its date (which
# becomes SOURCE_DATE_EPOCH) is the last commit's, so rebuilding a commit gives the same dates.
when=$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)
cat > "$src/debian/changelog" <<EOF
cadenza ($version) unstable; urgency=medium

  * Built from the cadenza source tree by packaging/build-deb.sh.

 -- cadenza maintainers <root@localhost>  $(date -R -u -d "@$when")
EOF

echo "build-deb: building cadenza $version in $src"
(cd "$src" && dpkg-buildpackage -us -uc -b)

mkdir -p "$outdir"
deb=$(cd "$work" && ls cadenza_"$version"_*.deb)
cp "$work/$deb" "$outdir/"
echo "build-deb: $(cd "$outdir" && pwd)/$deb"
