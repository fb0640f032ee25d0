# A compressed newc cpio archive holding the *whole* runtime closure of some store paths, at
# their /nix/store paths.
#
# makeInitrdNG copies a store object plus the ELF libraries it links (interpreter and RUNPATH),
# but not the store paths a *script* refers to. nixos-install and nixos-enter are bash scripts
# with their bash, jq and util-linux baked in as store paths, so they come in whole through this
# archive instead. The result is meant for makeInitrdNG's `prepend` (the kernel unpacks
# concatenated archives one after the other, each compressed or not). It has no entries for
# /nix and /nix/store: an archive unpacked before it must create them.
{
  lib,
  runCommand,
  closureInfo,
  buildPackages,
  # Store paths (packages) whose closures go into the archive.
  rootPaths,
  # Compressor command and arguments, e.g. [ "zstd" "-19" "-T0" ]; its stdout is the archive.
  compressCommand ? [
    "zstd"
    "-19"
    "-T0"
  ],
}:

runCommand "nixos-kexec-store.cpio"
  {
    nativeBuildInputs = [
      buildPackages.cpio
      buildPackages.zstd
      buildPackages.xz
      buildPackages.gzip
    ];
    closure = closureInfo { inherit rootPaths; };
    # Also plain inputs, so the paths are certainly in the build sandbox.
    inherit rootPaths;
    compress = lib.escapeShellArgs compressCommand;
  }
  ''
    set -euo pipefail
    cd /
    # Only the store paths: the directories /nix and /nix/store come from the skeleton archive
    # (initrd-skeleton.sh), which the kernel unpacks before this one.
    sed 's,^/,,' "$closure/store-paths" | tr '\n' '\0' | xargs -0 -r sh -c 'find "$@" -print0' find \
      | LC_ALL=C sort -z -u \
      | cpio --quiet -o -H newc -R +0:+0 --reproducible --null \
      | eval "$compress" > "$out"
    echo "closure of: $rootPaths"
    echo "store paths: $(wc -l < "$closure/store-paths"), archive: $(stat -c %s "$out") bytes"
  ''
