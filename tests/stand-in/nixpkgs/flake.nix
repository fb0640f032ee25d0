# TEST DOUBLE for nixpkgs, used only by the tests (tests/src/stand_in_nixpkgs.rs packs it as a
# tarball flake). The real nixpkgs cannot be had on the machines that run the tests (no network
# to GitHub, and evaluating NixOS takes more time and memory than the suite has), so this flake
# stands in for the part of it a host flake touches: `lib.nixosSystem`, whose module system
# (lib.nix) merges the modules it is given as NixOS's does for the options they set, and whose
# `config.system.build.toplevel` is a derivation holding the merged configuration as JSON.
# Everything around it is real: Debian's Nix fetches it, evaluates the host flake and the
# user's flake with it, and builds the system in its sandbox.
{
  description = "stand-in nixpkgs (TEST DOUBLE): lib.nixosSystem merging modules";

  outputs = { self }: {
    lib = import ./lib.nix { inherit self; };
  };
}
