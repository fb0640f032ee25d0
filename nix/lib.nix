# lib.mkInstaller: evaluates the installer module on its own (no NixOS system around it) and
# returns its results, `config.nixosKexec.build`:
#   { bundle, netboot, initrd, kernel, kernelModules, agent }
# plus `config` and `options` of the evaluation.
#
#   mkInstaller {
#     pkgs = nixpkgs.legacyPackages.x86_64-linux;
#     modules = [ { nixosKexec.extraKernelModules = [ "r8169" ]; } ];
#   }
{ lib }:

{
  pkgs,
  modules ? [ ],
}:

let
  evaluated = lib.evalModules {
    modules = [ ./installer-module.nix ] ++ modules;
    specialArgs = { inherit pkgs; };
  };
in
evaluated.config.nixosKexec.build
// {
  inherit (evaluated) config options;
}
