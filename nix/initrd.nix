# The installer initrd: minimal by design, not a NixOS netboot system.
#
# The kernel unpacks these archives in order (later entries overwrite earlier ones):
#   1. skeleton (uncompressed, written by initrd-skeleton.sh): mount points, /dev/console and
#      /dev/null, which the kernel needs before it starts /init
#   2. modules (zstd): /lib/modules/<version>/ (uncompressed .ko + modules.dep),
#      /lib/firmware/, /etc/modules-load.d/nixos-kexec.conf -- real files, not symlinks
#   3. store closure (zstd): the whole closure of the script tools (nixos-install, nixos-enter)
#   4. makeInitrdNG (zstd): /init = the agent, /bin and /sbin with the tools (each copied with the
#      shared libraries it links), /etc files (CA bundle, nix.conf, passwd, defaults)
#
# Nothing here holds the Nix store of the install: the agent mounts the target at /mnt and Nix
# works there (`nixos-install --root /mnt`, and `store = /mnt` in /etc/nix/nix.conf for every
# other nix command), so the store grows on the disk, not in RAM.
#
# nixpkgs functions used (pkgs/top-level/all-packages.nix): makeInitrdNG (make-initrd-ng.nix:
# name, compressor, compressorArgs, contents = [{ source; target; }], prepend, strip),
# closureInfo, buildEnv, writeText, runCommand.
{
  lib,
  buildPackages,
  callPackage,
  runCommand,
  makeInitrdNG,
  buildEnv,
  writeText,
  cacert,
  # The static agent; it becomes /init.
  agent,
  # The output of nix/kernel-modules.nix.
  kernelModules,
  # Packages whose bin/ (and sbin/) go to /bin; makeInitrdNG follows ELF dependencies only.
  binPackages,
  # Packages that come with their whole runtime closure (scripts with store references).
  closurePackages ? [ ],
  # Text of /etc/nix/nix.conf, or null for none.
  nixConf ? null,
  # Defaults the agent reads from /etc/nixos-kexec/defaults.json (an attrset), or null.
  defaults ? null,
  # PEM files of private CAs the agent trusts for https:// config URLs, besides cacert's.
  caCertificates ? [ ],
  compressor ? "zstd",
  compressorArgs ? [
    "-19"
    "-T0"
  ],
}:

let
  compressCommand = [ compressor ] ++ compressorArgs;

  skeleton = runCommand "nixos-kexec-initrd-skeleton.cpio" { } ''
    bash ${./initrd-skeleton.sh} "$out"
  '';

  # Real files and directories (the agent reads /lib/modules/$(uname -r) and
  # /etc/modules-load.d), so they are archived as they are, not as symlinks into the store.
  modulesCpio =
    runCommand "nixos-kexec-initrd-modules.cpio"
      {
        nativeBuildInputs = [
          buildPackages.cpio
          buildPackages.zstd
          buildPackages.xz
          buildPackages.gzip
        ];
        compress = lib.escapeShellArgs compressCommand;
      }
      ''
        set -euo pipefail
        # A copy, so directories are 0755 and files 0644 rather than the store's read-only modes.
        mkdir stage
        cp -r --no-preserve=mode ${kernelModules}/lib ${kernelModules}/etc stage/
        cd stage
        find lib etc -exec touch -h -d @1 {} +
        find lib etc -print0 | LC_ALL=C sort -z \
          | cpio --quiet -o -H newc -R +0:+0 --reproducible --null \
          | eval "$compress" > "$out"
      '';

  storeCpio =
    if closurePackages == [ ] then
      null
    else
      callPackage ./store-cpio.nix {
        rootPaths = closurePackages;
        inherit compressCommand;
      };

  binEnv = buildEnv {
    name = "nixos-kexec-initrd-bin";
    paths = binPackages;
    pathsToLink = [
      "/bin"
      "/sbin"
    ];
    # busybox is added with lowPrio so the real tools win; other clashes (e.g. from
    # extraPackages) are resolved by order instead of failing the build.
    ignoreCollisions = true;
    # One directory for /bin and /sbin, as in NixOS' systemd initrd (initrdBinEnv).
    postBuild = ''
      if [ -e "$out/sbin" ]; then
        for f in "$out"/sbin/*; do
          name=$(basename "$f")
          if [ ! -e "$out/bin/$name" ] && [ ! -L "$out/bin/$name" ]; then
            ln -s "$(readlink -f "$f")" "$out/bin/$name"
          fi
        done
        rm -rf "$out/sbin"
      fi
    '';
  };

  etc =
    [
      {
        source = "${cacert}/etc/ssl/certs/ca-bundle.crt";
        target = "/etc/ssl/certs/ca-certificates.crt";
      }
      {
        # root, nobody and the nixbld build users that nix.conf names; shared with build-dev.
        source = "${./passwd}";
        target = "/etc/passwd";
      }
      {
        source = "${./group}";
        target = "/etc/group";
      }
    ]
    ++ lib.optional (nixConf != null) {
      source = "${writeText "nix.conf" nixConf}";
      target = "/etc/nix/nix.conf";
    }
    ++ lib.optional (defaults != null) {
      source = "${writeText "nixos-kexec-defaults.json" (builtins.toJSON defaults)}";
      target = "/etc/nixos-kexec/defaults.json";
    }
    # Numbered, so two files with the same name from different directories both arrive.
    ++ lib.imap0 (index: file: {
      source = "${file}";
      target = "/etc/nixos-kexec/ca/${toString index}.pem";
    }) caCertificates;
in
(makeInitrdNG {
  name = "nixos-kexec-initrd";
  inherit compressor compressorArgs;

  prepend = [
    "${skeleton}"
    "${modulesCpio}"
  ]
  ++ lib.optional (storeCpio != null) "${storeCpio}";

  contents = [
    {
      source = "${agent}/bin/nixos-kexec";
      target = "/init";
    }
    {
      source = "${binEnv}/bin";
      target = "/bin";
    }
    {
      source = "${binEnv}/bin";
      target = "/sbin";
    }
    {
      source = "${binEnv}/bin/env";
      target = "/usr/bin/env";
    }
  ]
  ++ etc;
}).overrideAttrs
  (old: {
    passthru = (old.passthru or { }) // {
      # The pieces, for inspection and tests.
      nixosKexecParts = {
        inherit
          skeleton
          modulesCpio
          storeCpio
          binEnv
          ;
      };
    };
  })
