#!/bin/sh
# complete.sh DIR TARBALL VENV ID   (the role feeds it to sh on stdin)
# Writes DIR/.cadenza-release, the marker that makes the release one current may point to, once
# it has its cadenza.toml and (VENV=true) a venv with cadenza in it.
set -u
dir=$1 tarball=$2 venv=$3 id=$4
cd "$dir" || exit 1
if [ ! -f cadenza.toml ]; then
    echo "$tarball unpacked into $dir has no cadenza.toml at its top: put it there, or strip the" \
         "tarball's top directory with cadenza_release_unarchive_opts: [\"--strip-components=1\"]" >&2
    exit 1
fi
if [ "$venv" = true ] && [ ! -x .venv/bin/cadenza ]; then
    echo "$dir/.venv has no bin/cadenza, which the pinned launchers run: list cadenza in the" \
         "release's requirements (or have cadenza_venv_command install it)" >&2
    exit 1
fi
printf '%s\n' "$id" > .cadenza-release.tmp && mv -f .cadenza-release.tmp .cadenza-release
