# The kernel modules of the installer initrd, and the list the agent loads at start.
#
# Output:
#   $out/lib/modules/<version>/...                       the module closure, every module an
#                                                        uncompressed .ko, with a fresh modules.dep
#                                                        (+ modules.builtin from the kernel)
#   $out/lib/firmware/...                                firmware the modules ask for, when given
#   $out/etc/modules-load.d/nixos-kexec.conf             module names, one a line, `#` comments
#
# The agent is PID 1 and there is no modprobe/udev: it reads etc/modules-load.d/*.conf, resolves
# /lib/modules/$(uname -r)/modules.dep itself and loads each module with finit_module(2) without
# flags. That is why every module is decompressed here: nixpkgs kernels may install modules as
# .ko.xz (or .zst/.gz), and finit_module only takes those with MODULE_INIT_COMPRESSED_FILE and a
# kernel built with CONFIG_MODULE_DECOMPRESS. The initrd as a whole is zstd-compressed anyway.
#
# The closure itself comes from nixpkgs' makeModulesClosure (pkgs/build-support/kernel/
# modules-closure.nix and modules-closure.sh: arguments kernel, firmware, rootModules,
# allowMissing, extraFirmwarePaths), called twice: once for the modules the installer must
# have (a missing one fails the build unless allowMissing) and once for nice-to-have modules
# that some kernels lack or build in (always allowMissing).
{
  lib,
  buildPackages,
  runCommand,
  makeModulesClosure,
  aggregateModules,
  buildEnv,
  # A kernel package (e.g. pkgs.linuxPackages.kernel).
  kernel,
  # Extra packages with modules for this kernel (e.g. some kernelPackages.<module>).
  extraModulePackages ? [ ],
  # Modules that must be there (their dependencies come along).
  kernelModules,
  # Fail the build when one of kernelModules is neither a module nor built in.
  allowMissing ? false,
  # Modules loaded when the kernel has them; missing ones are skipped silently.
  optionalKernelModules ? [ ],
  # Packages with lib/firmware; only the files the chosen modules name are copied.
  firmware ? [ ],
}:

let
  # Newer nixpkgs kernels put the modules in a separate "modules" output (NixOS' kernel.nix
  # uses `kernel.modules or kernel`); lib.getOutput falls back to the default output.
  modulesTree = aggregateModules ([ (lib.getOutput "modules" kernel) ] ++ extraModulePackages);

  firmwareTree = buildEnv {
    name = "nixos-kexec-firmware";
    paths = firmware;
    pathsToLink = [ "/lib/firmware" ];
  };

  closureOf =
    name: rootModules: allowMissing:
    (makeModulesClosure {
      kernel = modulesTree;
      firmware = firmwareTree;
      inherit rootModules allowMissing;
    }).overrideAttrs
      (_: {
        name = "nixos-kexec-${name}-modules";
      });

  required = closureOf "required" kernelModules allowMissing;
  optional = closureOf "optional" optionalKernelModules true;

  allNames = kernelModules ++ optionalKernelModules;
in
runCommand "nixos-kexec-kernel-modules"
  {
    nativeBuildInputs = [
      buildPackages.kmod
      buildPackages.xz
      buildPackages.zstd
      buildPackages.gzip
    ];
    inherit required optional modulesTree;
    moduleNames = lib.concatStringsSep " " allNames;
    passthru = {
      inherit modulesTree required optional;
    };
  }
  ''
    set -euo pipefail

    version=$(cd "$modulesTree/lib/modules" && ls)
    echo "kernel version: $version"
    moddir="$out/lib/modules/$version"
    mkdir -p "$moddir"

    # Merge both closures (modules and firmware). The closures are read-only store paths.
    for closure in "$required" "$optional"; do
      if [ -d "$closure/lib" ]; then
        cp -r --no-preserve=mode --no-clobber "$closure/lib/." "$out/lib/"
      fi
    done
    rm -f "$out/insmod-list"

    # Plain .ko files for finit_module(2) without flags. -f: a module that both closures hold
    # may be there twice, compressed and not (same content).
    find "$moddir" -name '*.ko.xz' -exec xz -d -f {} +
    find "$moddir" -name '*.ko.zst' -exec zstd -q -d -f --rm {} +
    find "$moddir" -name '*.ko.gz' -exec gzip -d -f {} +

    # Which modules are built into this kernel: the agent skips those instead of failing.
    for f in modules.builtin modules.builtin.modinfo modules.order; do
      if [ -e "$modulesTree/lib/modules/$version/$f" ]; then
        cp --no-preserve=mode "$modulesTree/lib/modules/$version/$f" "$moddir/$f"
      fi
    done
    depmod -b "$out" -a "$version"
    rm -f "$moddir/modules.order"

    # The list the agent loads, in the order given. A name stays as the file name it has in
    # modules.dep (dm_crypt -> dm-crypt) so that it matches with or without normalising
    # dashes and underscores; names that are built in or absent are kept as comments.
    mkdir -p "$out/etc/modules-load.d"
    conf="$out/etc/modules-load.d/nixos-kexec.conf"
    {
      echo "# Kernel modules the nixos-kexec agent loads at start (it resolves modules.dep itself)."
      echo "# Generated by nix/kernel-modules.nix for kernel $version."
    } > "$conf"
    sed -n 's,^\([^:]*\):.*,\1,p' "$moddir/modules.dep" | sed 's,.*/,,; s,\.ko$,,' > stems
    touch builtin
    if [ -e "$moddir/modules.builtin" ]; then
      sed 's,.*/,,; s,\.ko$,,' "$moddir/modules.builtin" | tr - _ > builtin
    fi
    for name in $moduleNames; do
      want=$(printf '%s' "$name" | tr - _)
      found=""
      while read -r stem; do
        if [ "$(printf '%s' "$stem" | tr - _)" = "$want" ]; then
          found=$stem
          break
        fi
      done < stems
      if [ -n "$found" ]; then
        grep -qx -e "$found" "$conf" || echo "$found" >> "$conf"
      elif grep -qx -e "$want" builtin; then
        echo "# $name: built into the kernel" >> "$conf"
      else
        echo "# $name: not available in this kernel" >> "$conf"
        echo "warning: kernel module $name is not available in kernel $version" >&2
      fi
    done
    rm -f stems builtin

    echo "modules-load.d/nixos-kexec.conf:"
    cat "$conf"
    if [ -n "$(find "$moddir" -name '*.ko.*' -print -quit)" ]; then
      echo "error: compressed modules left in $moddir" >&2
      exit 1
    fi
  ''
