# The host flake nixos-kexec wrote for this machine. Keep it in git; change the system with
#   nixos-rebuild switch --flake /etc/nixos#@hostname@
{
  description = "NixOS configuration for @hostname@";

  inputs.nixpkgs.url = "@nixpkgs@";

  outputs = { self, nixpkgs }: {
    nixosConfigurations."@hostname@" = nixpkgs.lib.nixosSystem {
      modules = [
        ./configuration.nix
        ./hardware-configuration.nix
      ];
    };
  };
}
