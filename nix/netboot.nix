# Netboot files: serve this directory over HTTP or TFTP and boot it from iPXE.
#
#   $out/bzImage        the kernel (on aarch64 $out/Image, as the kexec bundle names it)
#   $out/initrd         the installer initrd (the same as in the kexec bundle)
#   $out/netboot.ipxe   iPXE script
#
# The script passes `initrd=initrd` (the EFI stub finds the initrd by that name) and the default
# parameters; anything in the iPXE variable ${cmdline} is appended, so a PXE fleet can chain it:
#
#   set cmdline nixos_kexec.config_url=http://10.0.0.1/hosts/${mac}.json
#   chain http://10.0.0.1/nixos-kexec/netboot.ipxe
#
# (nixpkgs' own nixos/modules/installer/netboot/netboot.nix writes its netboot.ipxe the same
# way.) The agent reads nixos_kexec.* parameters from /proc/cmdline.
{
  lib,
  runCommand,
  stdenv,
  writeText,
  kernelImage,
  initrd,
  kernelParams,
}:

let
  # isAarch64: the platform predicate of nixpkgs' lib/systems/inspect.nix (cpu family arm,
  # 64 bits), checked there through the code index on 2026-12-01.
  kernelFile = if stdenv.hostPlatform.isAarch64 then "Image" else "bzImage";
  ipxe = writeText "netboot.ipxe" ''
    #!ipxe
    # nixos-kexec installer. Extra kernel parameters: `set cmdline ...` before chaining this script.
    kernel ${kernelFile} initrd=initrd ${lib.concatStringsSep " " kernelParams} ''${cmdline}
    initrd initrd
    boot
  '';
in
runCommand "nixos-kexec-netboot"
  {
    passthru = {
      inherit initrd;
      kernel = kernelImage;
      ipxeScript = ipxe;
    };
    meta.description = "nixos-kexec netboot files (${kernelFile}, initrd, netboot.ipxe)";
  }
  ''
    mkdir -p "$out"
    cp ${kernelImage} "$out/${kernelFile}"
    cp ${initrd}/initrd "$out/initrd"
    cp ${ipxe} "$out/netboot.ipxe"
    chmod 0644 "$out/${kernelFile}" "$out/initrd" "$out/netboot.ipxe"
  ''
