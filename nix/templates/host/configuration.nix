# The system's configuration. nixos-kexec wrote the first version; it is yours to edit.
{ config, lib, pkgs, ... }:

let
  # What the machine booted with when it was installed: "uefi" or "bios".
  firmware = "@firmware@";
  # The disk GRUB is written to on BIOS machines.
  bootDisk = "@boot_disk@";
in
{
  imports = [ /*@imports@*/ ];

  boot.loader.systemd-boot.enable = firmware == "uefi";
  boot.loader.efi.canTouchEfiVariables = firmware == "uefi";
  boot.loader.grub.enable = firmware == "bios";
  boot.loader.grub.device = if firmware == "bios" then bootDisk else "nodev";

  /*@serial_console@*/

  networking.hostName = "@hostname@";

  services.openssh = {
    enable = true;
    settings = {
      PasswordAuthentication = false;
      KbdInteractiveAuthentication = false;
      PermitRootLogin = "prohibit-password";
    };
  };

  users.users.root.openssh.authorizedKeys.keys = [
    /*@authorized_keys@*/
  ];

  # The release this machine was first installed with; see `man configuration.nix`
  # before changing it.
  system.stateVersion = "@state_version@";
}
