# Unlocking the encrypted disk from afar. At boot the initrd brings up the network with the same
# configuration as the system and starts sshd on its own port with its own host key (the
# fingerprint nixos-kexec printed as "initrd host key"). Log in and type the passphrase:
#
#   ssh -p @port@ root@<address> systemd-tty-ask-password-agent
#
# nixos-kexec wrote this; it is yours to edit.
{ config, lib, ... }:

{
  # systemd in the initrd runs networkd, which takes the same MAC-matched networks as the system.
  boot.initrd.systemd.enable = true;

  # The NIC drivers, so the network exists before the disk is unlocked.
  boot.initrd.availableKernelModules = [ /*@nic_modules@*/ ];

  boot.initrd.network = {
    enable = true;
    ssh = {
      enable = true;
      # Not 22: the initrd's host key differs from the system's, and a client that knows the
      # system's key on port 22 would otherwise refuse to connect.
      port = lib.toInt "@port@";
      authorizedKeys = config.users.users.root.openssh.authorizedKeys.keys;
      # A path, not a Nix path literal, so the key stays out of the Nix store; NixOS appends it
      # to the initrd on /boot (boot.initrd.secrets).
      hostKeys = [ "@host_key@" ];
    };
  };

  /*@initrd_network@*/
}
