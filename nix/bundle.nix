# The kexec bundle: what an operator copies to a rescue system and runs there.
#
#   $out/bzImage                                   the kernel; on aarch64 $out/Image (uncompressed:
#                                                  kexec_file_load on arm64 takes nothing else),
#                                                  the name `nixos-kexec run` looks for there
#   $out/initrd                                    the installer initrd (nix/initrd.nix)
#   $out/nixos-kexec                               the static agent, run on the rescue system
#   $out/run-installer                             kexec-bundle/run-installer: runs
#                                                  ./nixos-kexec run --bundle <its dir> "$@"
#   $out/kernel-params                             default kernel parameters, one line
#   $out/nixos-kexec-bundle-<system>.tar.gz        all of the above in nixos-kexec-bundle/
#
# The rescue system needs nothing but a POSIX sh and tar: the agent loads the kernel itself
# (kexec_file_load) and builds the appended cpio with the runtime info and secrets itself.
{
  lib,
  runCommand,
  stdenv,
  agent,
  kernelImage,
  initrd,
  kernelParams,
  runInstaller ? ../kexec-bundle/run-installer,
}:

let
  tarballName = "nixos-kexec-bundle-${stdenv.hostPlatform.system}.tar.gz";
  # agent/src/rescue/kexec.rs, KERNEL_FILE.
  # isAarch64: the platform predicate of nixpkgs' lib/systems/inspect.nix (cpu family arm,
  # 64 bits), checked there through the code index on 2026-12-01.
  kernelFile = if stdenv.hostPlatform.isAarch64 then "Image" else "bzImage";
in
runCommand "nixos-kexec-bundle-${stdenv.hostPlatform.system}"
  {
    # run-installer runs on the rescue system: its #!/bin/sh must stay as it is.
    dontPatchShebangs = true;
    kernelParams = lib.concatStringsSep " " kernelParams;
    passthru = {
      inherit tarballName agent initrd;
      kernel = kernelImage;
    };
    meta.description = "nixos-kexec bundle (kernel, installer initrd, agent, run-installer) and its tarball";
  }
  ''
    set -euo pipefail
    mkdir -p "$out"
    cp ${kernelImage} "$out/${kernelFile}"
    cp ${initrd}/initrd "$out/initrd"
    cp ${agent}/bin/nixos-kexec "$out/nixos-kexec"
    cp ${runInstaller} "$out/run-installer"
    printf '%s\n' "$kernelParams" > "$out/kernel-params"
    chmod 0644 "$out/${kernelFile}" "$out/initrd" "$out/kernel-params"
    chmod 0755 "$out/nixos-kexec" "$out/run-installer"

    mkdir -p stage/nixos-kexec-bundle
    cp -p "$out/${kernelFile}" "$out/initrd" "$out/nixos-kexec" "$out/run-installer" "$out/kernel-params" \
      stage/nixos-kexec-bundle/
    tar -C stage --sort=name --mtime=@1 --owner=0 --group=0 --numeric-owner \
      -cf - nixos-kexec-bundle | gzip -9n > "$out/${tarballName}"

    echo "bundle sizes (bytes):"
    (cd "$out" && stat -c '%s %n' ${kernelFile} initrd nixos-kexec ${tarballName})
  ''
