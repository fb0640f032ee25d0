# The system's configuration. nixos-kexec wrote the first version; it is yours to edit.
{ config, lib, pkgs, ... }:

{
  imports = [ /*@imports@*/ ];

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
