# nixosModules.installer: the options that shape a nixos-kexec bundle, and the bundle itself.
#
# The module declares options under `nixosKexec` and sets the read-only `nixosKexec.build`
# (kernel, initrd, bundle, netboot, ...). It needs nothing from NixOS but the `pkgs` module
# argument and `lib`, so it works in two ways:
#
#   * standalone, through the flake's `lib.mkInstaller` (lib.evalModules with this module only;
#     that is how `packages.<system>.kexec-bundle` is built):
#
#       (nixos-kexec.lib.mkInstaller {
#         pkgs = nixpkgs.legacyPackages.x86_64-linux;
#         modules = [ { nixosKexec.extraKernelModules = [ "r8169" ]; } ];
#       }).bundle
#
#   * inside any NixOS configuration (it changes nothing in that system):
#
#       (nixpkgs.lib.nixosSystem {
#         modules = [ nixos-kexec.nixosModules.installer { nixpkgs.hostPlatform = "x86_64-linux"; } ];
#       }).config.nixosKexec.build.bundle
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib) mkOption types;
  cfg = config.nixosKexec;
  platform = pkgs.stdenv.hostPlatform;

  # Bump together with the nixpkgs input of flake.nix.
  defaultNixpkgsRef = "github:NixOS/nixpkgs/nixos-26.05";

  # What a rented VM or a server's rescue system needs to see its disks and NICs.
  commonModules = [
    # virtio (KVM/QEMU clouds)
    "virtio_pci"
    "virtio_blk"
    "virtio_scsi"
    "virtio_net"
    # NVMe, SATA/AHCI, SCSI disks
    "nvme"
    "ahci"
    "sd_mod"
    # Xen (older AWS, some VPS hosters)
    "xen-blkfront"
    "xen-netfront"
    # Hyper-V / Azure
    "hv_vmbus"
    "hv_storvsc"
    "hv_netvsc"
    # AWS ENA, Intel, Mellanox, Broadcom server NICs
    "ena"
    "e1000e"
    "igb"
    "ixgbe"
    "i40e"
    "mlx5_core"
    "bnxt_en"
    # filesystems and encryption the installer writes
    "ext4"
    "vfat"
    "nls_cp437"
    "nls_ascii"
    "nls_iso8859_1"
    "btrfs"
    "dm_crypt"
    # Packet sockets: busybox udhcpc sends and receives DHCP through them. NixOS kernels
    # build it as a module (NixOS' own DHCP in the initrd loads it:
    # boot.initrd.kernelModules = [ "af_packet" ] in nixos/modules/system/boot/initrd-network.nix);
    # a kernel that builds it in is fine too (makeModulesClosure skips built-in modules).
    "af_packet"
  ];

  # Loaded when the kernel has them as modules (some are built in, renamed, or only exist on
  # one architecture): crypto the kernel would otherwise ask modprobe for (there is none),
  # efivarfs for installing a UEFI boot loader, and a few more NICs and disk controllers
  # (e1000 is QEMU's default NIC; r8169 is on many rented dedicated servers).
  commonOptionalModules = [
    "crc32c_generic"
    "crc32c-intel"
    "xts"
    "aesni_intel"
    "algif_skcipher"
    "efivarfs"
    "e1000"
    "r8169"
    "igc"
    "megaraid_sas"
    "mpt3sas"
    "virtio_mmio"
  ];

  defaultConsoleParams =
    if platform.isAarch64 then
      [
        "console=ttyAMA0,115200"
        "console=tty0"
      ]
    else
      [
        "console=ttyS0,115200"
        "console=tty0"
      ];

  kernelPackages = cfg.kernelPackages;
  kernel = kernelPackages.kernel;
  # The image file the kernel build installs (bzImage on x86_64, Image on aarch64). Kernels
  # carry it as `kernel.target` (passthru of pkgs/os-specific/linux/kernel/build.nix, nixpkgs
  # master 2026, commit 001ef8c47d5f); nixpkgs PR #530133 (June 2026) moved it there out of the
  # platform, whose `linux-kernel` lib/systems now refuses. Kernels of older nixpkgs may lack
  # the attribute and only have `stdenv.hostPlatform.linux-kernel.target`; `or` falls back to
  # it then, and leaves it unevaluated (so it cannot throw) when the kernel has `target`. Other
  # modules do the same (`kernel.target or ...linux-kernel.target` in NixOS' bootspec and qemu-vm
  # modules of that time).
  kernelImage = "${kernel}/${kernel.target or platform.linux-kernel.target}";

  # rootfstype=ramfs: the kernel's default rootfs is a tmpfs capped at half the RAM, which a big
  # initrd overflows on a small machine; ramfs has no cap, and the agent moves the root onto a
  # tmpfs of its own anyway. Also in build-dev's recipes and in what `nixos-kexec run` passes.
  allKernelParams = [ "rootfstype=ramfs" ] ++ cfg.kernelParams ++ cfg.extraKernelParams;

  # nix.conf is shared with kexec-bundle/build-dev; the module only appends the user's lines.
  nixConf = builtins.readFile ./nix.conf + cfg.extraNixConfig;

  # The agent reads this file as the lowest layer of its runtime info, so the keys are the
  # runtime-info names (state_version, not stateVersion).
  defaults = lib.filterAttrs (_: v: v != null) {
    version = 1;
    nixpkgs = cfg.defaultNixpkgs;
    layout = cfg.defaultLayout;
    state_version = cfg.defaultStateVersion;
  };

  modules = pkgs.callPackage ./kernel-modules.nix {
    inherit kernel;
    inherit (cfg) extraModulePackages firmware;
    kernelModules = cfg.kernelModules ++ cfg.extraKernelModules;
    optionalKernelModules = cfg.optionalKernelModules;
    allowMissing = cfg.allowMissingModules;
  };

  withNix = cfg.nix != null;
  withInstall = cfg.nixosInstall != null;
  withGit = cfg.git != null;
  withSshServer = cfg.sshServer != null;

  initrd = pkgs.callPackage ./initrd.nix {
    agent = cfg.agent;
    kernelModules = modules;
    binPackages =
      [
        cfg.agent
        pkgs.coreutils
        pkgs.e2fsprogs
        pkgs.btrfs-progs
        pkgs.cryptsetup
        (lib.lowPrio pkgs.pkgsStatic.busybox)
      ]
      ++ lib.optional withNix cfg.nix
      ++ lib.optional withInstall cfg.nixosInstall
      ++ lib.optional withGit cfg.git
      ++ lib.optional withSshServer cfg.sshServer
      ++ cfg.extraPackages;
    closurePackages =
      lib.optional withInstall cfg.nixosInstall ++ lib.optional withGit cfg.git ++ cfg.extraStorePaths;
    nixConf = if withNix then nixConf else null;
    inherit defaults;
    inherit (cfg) compressor compressorArgs caCertificates;
  };

  bundle = pkgs.callPackage ./bundle.nix {
    agent = cfg.agent;
    inherit kernelImage initrd;
    kernelParams = allKernelParams;
  };

  netboot = pkgs.callPackage ./netboot.nix {
    inherit kernelImage initrd;
    kernelParams = allKernelParams;
  };
in
{
  options.nixosKexec = {
    agent = mkOption {
      type = types.package;
      default = pkgs.pkgsStatic.callPackage ./agent.nix { };
      defaultText = lib.literalExpression "pkgs.pkgsStatic.callPackage ./agent.nix { }";
      description = ''
        The nixos-kexec agent: a static binary with bin/nixos-kexec. It is /init of the initrd
        and the program run-installer starts on the rescue system.
      '';
    };

    kernelPackages = mkOption {
      type = types.raw;
      default = pkgs.linuxPackages;
      defaultText = lib.literalExpression "pkgs.linuxPackages";
      example = lib.literalExpression "pkgs.linuxPackages_latest";
      description = ''
        The kernel package set of the installer (only its `kernel` is used). The installed
        system chooses its own kernel.
      '';
    };

    kernelModules = mkOption {
      type = types.listOf types.str;
      default = commonModules;
      description = ''
        Kernel modules the installer loads at start, in this order; their dependencies come
        along. The default covers common cloud and server hardware. To add modules, use
        extraKernelModules.
      '';
    };

    extraKernelModules = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "r8169"
        "ice"
      ];
      description = "More kernel modules to include and load, after kernelModules.";
    };

    optionalKernelModules = mkOption {
      type = types.listOf types.str;
      default = commonOptionalModules;
      description = ''
        Kernel modules loaded when the kernel has them as modules; missing or built-in ones
        are skipped without failing the build.
      '';
    };

    allowMissingModules = mkOption {
      type = types.bool;
      default = !platform.isx86_64;
      defaultText = lib.literalExpression "!pkgs.stdenv.hostPlatform.isx86_64";
      description = ''
        Whether a module of kernelModules that the kernel does not have is skipped (true) or
        fails the build (false). The default list was chosen for x86_64; on other
        architectures some of it (Xen, Hyper-V, x86 NICs) may not exist, so missing modules
        are skipped there. The generated /etc/modules-load.d/nixos-kexec.conf names every
        skipped module in a comment.
      '';
    };

    extraModulePackages = mkOption {
      type = types.listOf types.package;
      default = [ ];
      example = lib.literalExpression "[ config.nixosKexec.kernelPackages.r8168 ]";
      description = "Packages with out-of-tree modules for the installer's kernel.";
    };

    firmware = mkOption {
      type = types.listOf types.package;
      default = [ ];
      example = lib.literalExpression "[ pkgs.linux-firmware ]";
      description = ''
        Packages with lib/firmware. Only the firmware files the included modules name are
        copied into the initrd.
      '';
    };

    extraPackages = mkOption {
      type = types.listOf types.package;
      default = [ ];
      example = lib.literalExpression "[ pkgs.util-linux pkgs.iproute2 ]";
      description = ''
        Packages whose bin/ and sbin/ are added to /bin of the initrd. Each program comes with
        the shared libraries it links; store paths a script refers to do not (put such
        packages in extraStorePaths as well).
      '';
    };

    extraStorePaths = mkOption {
      type = types.listOf types.package;
      default = [ ];
      description = "Packages copied into the initrd with their whole runtime closure.";
    };

    nix = mkOption {
      type = types.nullOr types.package;
      default = pkgs.pkgsStatic.nix;
      defaultText = lib.literalExpression "pkgs.pkgsStatic.nix";
      description = ''
        The Nix the installer runs (`nix`, `nix-env`, ... in /bin). A static build keeps the
        initrd small. null builds a bundle without Nix, which can prepare disks and the host
        flake but not install (boot it with nixos_kexec.stop_before=install).
      '';
    };

    nixosInstall = mkOption {
      type = types.nullOr types.package;
      default = pkgs.nixos-install or pkgs.nixos-install-tools;
      defaultText = lib.literalExpression "pkgs.nixos-install";
      description = ''
        The package with bin/nixos-install (nixpkgs' pkgs/by-name/ni/nixos-install; it brings
        nixos-enter, jq and util-linux along). It is a bash script, so it comes with its whole
        closure. null leaves it out.
      '';
    };

    # pkgs.gitMinimal: pkgs/top-level/all-packages.nix (`gitMinimal = git.override { withManual
    # = false; pythonSupport = false; perlSupport = false; withpcre2 = false; }`, nixos-25.11).
    git = mkOption {
      type = types.nullOr types.package;
      default = pkgs.gitMinimal;
      defaultText = lib.literalExpression "pkgs.gitMinimal";
      description = ''
        The git Nix runs to fetch a user's flake given as git+https:// (nixos_kexec.flake=,
        `run --flake`); github:, gitlab: and tarball flakes need none. It comes with its whole
        closure (git-remote-https is in its libexec). null leaves it out.
      '';
    };

    sshServer = mkOption {
      type = types.nullOr types.package;
      default = pkgs.dropbear;
      defaultText = lib.literalExpression "pkgs.dropbear";
      description = ''
        The installer's SSH server: a package with bin/dropbear (sbin/ is merged into bin/)
        and bin/dropbearconvert (pkgs/by-name/dr/dropbear; its pass-path.patch gives sessions
        the agent's PATH). The agent starts it once the network is up, for root with the
        runtime info's authorized keys and the installed system's host key, no passwords.
        Dropbear rather than OpenSSH for size: no libcrypto, Kerberos or PAM in the initrd.
        null leaves it out; the installer then says it has no SSH server.
      '';
    };

    caCertificates = mkOption {
      type = types.listOf types.path;
      default = [ ];
      example = lib.literalExpression "[ ./provisioning-ca.pem ]";
      description = ''
        PEM files of private CAs that the installer trusts for https:// config URLs
        (nixos_kexec.config_url), in addition to the public CAs of cacert. They are put at
        /etc/nixos-kexec/ca/ in the initrd.
      '';
    };

    extraNixConfig = mkOption {
      type = types.lines;
      default = "";
      example = ''
        extra-substituters = https://cache.example.org
        extra-trusted-public-keys = cache.example.org-1:...
      '';
      description = "Lines appended to /etc/nix/nix.conf of the initrd.";
    };

    defaultNixpkgs = mkOption {
      type = types.str;
      default = defaultNixpkgsRef;
      description = ''
        The nixpkgs flake reference the host flake uses when the runtime info names none.
        Written to /etc/nixos-kexec/defaults.json in the initrd.
      '';
    };

    defaultStateVersion = mkOption {
      type = types.str;
      # lib.trivial.release: "the current nixpkgs release number as string", e.g. "26.05"
      # (lib/trivial.nix, read from lib/.version; the same in nixpkgs 25.11 and 26.05).
      default = lib.trivial.release;
      defaultText = lib.literalExpression "lib.trivial.release";
      example = "25.11";
      description = ''
        The `system.stateVersion` the host flake gets when the runtime info names none: the
        release of the nixpkgs this bundle was built from, which is also the release of
        defaultNixpkgs unless that was changed. Set both together. Written to
        /etc/nixos-kexec/defaults.json as `state_version`.
      '';
    };

    defaultLayout = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = ''
        The disk layout used when the runtime info names none (one of the layouts the agent
        knows; null: the agent's own default). Written to /etc/nixos-kexec/defaults.json.
      '';
    };

    kernelParams = mkOption {
      type = types.listOf types.str;
      default = defaultConsoleParams;
      defaultText = lib.literalExpression ''[ "console=ttyS0,115200" "console=tty0" ] # ttyAMA0 on aarch64'';
      description = ''
        Kernel parameters of the installer: in netboot.ipxe, and in the bundle's kernel-params
        file for `nixos-kexec run`. The last console= is /dev/console, where the agent reports.
      '';
    };

    extraKernelParams = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "nixos_kexec.after=poweroff" ];
      description = "More kernel parameters, after kernelParams.";
    };

    compressor = mkOption {
      type = types.str;
      default = "zstd";
      description = "Compressor of the initrd archives (a name makeInitrdNG knows, e.g. zstd, xz, gzip).";
    };

    compressorArgs = mkOption {
      type = types.listOf types.str;
      default = [
        "-19"
        "-T0"
      ];
      description = "Arguments of the compressor.";
    };

    build = mkOption {
      type = types.lazyAttrsOf types.raw;
      readOnly = true;
      description = ''
        The results: `bundle` (directory with bzImage (Image on aarch64), initrd, nixos-kexec, run-installer,
        kernel-params and the tarball), `netboot` (bzImage or Image, initrd, netboot.ipxe), and the
        pieces `initrd`, `kernel` (the image file), `kernelModules`, `agent`.
      '';
    };
  };

  config.nixosKexec.build = {
    inherit
      bundle
      netboot
      initrd
      ;
    kernel = kernelImage;
    kernelModules = modules;
    agent = cfg.agent;
  };
}
