# State that survives a reboot. `/` is a tmpfs (layout btrfs-impermanence), so everything else
# written to it is gone at the next boot; what must stay lives under the persist path.
# nixos-kexec wrote this; it is yours to edit (the impermanence module, if you add it, does the
# same and more: https://github.com/nix-community/impermanence).
{ ... }:

let
  persist = "@persist@";
in
{
  # The host flake: `nixos-rebuild --flake /etc/nixos` keeps working through the link.
  environment.etc."nixos".source = "${persist}/etc/nixos";

  # One machine-id for the machine's life (journald and DHCP client ids depend on it).
  environment.etc."machine-id".source = "${persist}/etc/machine-id";

  # The host keys nixos-kexec made (their fingerprints were printed during the install); sshd
  # would otherwise make new ones at every boot.
  services.openssh.hostKeys = [
    /*@host_keys@*/
  ];
}
