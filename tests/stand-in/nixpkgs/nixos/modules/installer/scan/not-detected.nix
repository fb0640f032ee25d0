# TEST DOUBLE for nixpkgs' installer/scan/not-detected.nix (see ../../../../flake.nix).
{ lib, ... }:
{
  hardware.enableRedistributableFirmware = lib.mkDefault true;
}
