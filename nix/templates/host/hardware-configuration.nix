# Hardware nixos-kexec found during the install, in the form nixos-generate-config writes.
# Regenerate with `nixos-generate-config` rather than editing when the hardware changes.
{ config, lib, pkgs, modulesPath, ... }:

let
  # What the machine booted with when it was installed: "uefi" or "bios".
  firmware = "@firmware@";
  # The disk GRUB is written to on BIOS machines.
  bootDisk = "@boot_disk@";
in
{
  imports = [ /*@hardware_imports@*/ ];

  # The boot loader for that firmware: the installer checked after the install that the
  # firmware will find it.
  boot.loader.systemd-boot.enable = firmware == "uefi";
  boot.loader.efi.canTouchEfiVariables = firmware == "uefi";
  boot.loader.grub.enable = firmware == "bios";
  boot.loader.grub.device = if firmware == "bios" then bootDisk else "nodev";

  /*@serial_console@*/

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
