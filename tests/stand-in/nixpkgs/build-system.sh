# The stand-in's system builder (TEST DOUBLE; see flake.nix), run in Nix's build sandbox with
# the stand-in's busybox: the system a host flake evaluates to, with the configuration it merged.
set -eu
echo "stand-in build in Nix's sandbox: pid $$, uid $(id -u) ($(id -un)), uid_map $(tr -s ' ' </proc/self/uid_map | sed 's/^ //'), / holds $(ls / | tr '\n' ' ')"
mkdir -p "$out/bin" "$out/sw/bin"
ln -s "$tools/busybox" "$out/sw/bin/sh"
{
    echo "#!$tools/busybox sh"
    cat "$tools/switch-to-configuration"
} >"$out/bin/switch-to-configuration"
chmod 0555 "$out/bin/switch-to-configuration"
cp "$configurationPath" "$out/configuration.json"
echo "stand-in" >"$out/nixos-version"
