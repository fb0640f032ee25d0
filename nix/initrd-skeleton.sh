#!/usr/bin/env bash
# initrd-skeleton.sh OUT
#
# Writes an uncompressed newc cpio archive with the bare skeleton of the installer initrd:
# the mount points the agent uses, the device nodes /dev/console and /dev/null, and /nix/store
# (the store-closure archive that follows has entries for the store paths only).
#
# Why by hand: the kernel opens /dev/console for init's stdin/stdout/stderr *before* it runs
# /init. Most kernels unpack a built-in archive with that node first (usr/default_cpio_list),
# but one built with its own CONFIG_INITRAMFS_SOURCE may not, and then init starts without a
# console. Device nodes cannot be created in the Nix build sandbox (no mknod), and GNU cpio
# only archives files that exist, so the newc format is written here with printf
# (Documentation/driver-api/early-userspace/buffer-format.rst). An existing node is kept.
#
# Used by nix/initrd.nix as the first archive prepended to the makeInitrdNG one (the kernel
# unpacks concatenated archives in order, compressed or not). Needs bash, head, stat.
set -euo pipefail

out=${1:?usage: initrd-skeleton.sh OUT}
: > "$out"

ino=1

pad() { # pad the archive to a multiple of $1 bytes
    local size n
    size=$(stat -c %s "$out")
    n=$(( ($1 - size % $1) % $1 ))
    if [ "$n" -gt 0 ]; then head -c "$n" /dev/zero >> "$out"; fi
}

# entry NAME MODE(octal) NLINK RDEVMAJOR RDEVMINOR [DATA]
entry() {
    local name=$1 mode=$2 nlink=$3 major=$4 minor=$5 data=${6-}
    local namesize=$(( ${#name} + 1 ))
    # magic ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$ino" "$((8#$mode))" 0 0 "$nlink" 1 "${#data}" 0 0 "$major" "$minor" "$namesize" 0 >> "$out"
    printf '%s\0' "$name" >> "$out"
    pad 4
    if [ -n "$data" ]; then
        printf '%s' "$data" >> "$out"
        pad 4
    fi
    ino=$((ino + 1))
}

dir() { entry "$1" "$2" 2 0 0; }
chr() { entry "$1" "$2" 1 "$3" "$4"; }

dir dev 040755
chr dev/console 020600 5 1
chr dev/null 020666 1 3
dir proc 040555
dir sys 040555
dir run 040755
dir tmp 041777
dir mnt 040755
dir root 040700
dir etc 040755
dir var 040755
dir var/log 040755
dir nix 040755
dir nix/store 040755

ino=0
entry 'TRAILER!!!' 0 1 0 0
pad 512
