# Hardware nixos-kexec found during the install, in the form nixos-generate-config writes.
# Regenerate with `nixos-generate-config` rather than editing when the hardware changes.
{ config, lib, pkgs, modulesPath, ... }:

{
  imports = [ /*@hardware_imports@*/ ];

  boot.initrd.availableKernelModules = [ /*@initrd_modules@*/ ];
  boot.initrd.kernelModules = [ ];
  boot.kernelModules = [ ];
  boot.extraModulePackages = [ ];

  /*@file_systems@*/

  /*@luks_devices@*/

  swapDevices = [
    /*@swap_devices@*/
  ];

  networking.useDHCP = lib.mkDefault true;

  /*@hardware_settings@*/

  nixpkgs.hostPlatform = lib.mkDefault "@system@";
}
