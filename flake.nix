{
  description = "nixos-kexec: install NixOS on machines reachable only over the network (kexec bundle, netboot files, installer module)";

  # Bump together with defaultNixpkgsRef in nix/installer-module.nix.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      mkInstaller = import ./nix/lib.nix { inherit lib; };
    in
    {
      # Options that shape a bundle (nixosKexec.*) and the results (nixosKexec.build.*).
      # See nix/README.md.
      nixosModules.installer = ./nix/installer-module.nix;
      nixosModules.default = self.nixosModules.installer;

      # mkInstaller { pkgs; modules ? [ ]; } -> { bundle, netboot, initrd, kernel, ... }
      lib.mkInstaller = mkInstaller;

      packages = forAllSystems (
        pkgs:
        let
          installer = mkInstaller { inherit pkgs; };
        in
        {
          # The agent alone: static (musl), bin/nixos-kexec.
          nixos-kexec = installer.agent;
          # bzImage (Image on aarch64), initrd, nixos-kexec, run-installer, kernel-params and
          # nixos-kexec-bundle-<system>.tar.gz
          kexec-bundle = installer.bundle;
          # bzImage (Image on aarch64), initrd, netboot.ipxe
          netboot = installer.netboot;
          # The initrd alone (directory with `initrd`).
          initrd = installer.initrd;
          default = installer.bundle;
        }
      );
    };
}
