# The nixos-kexec agent: one static (musl) binary, built from this Cargo workspace.
#
# Call it with a static package set so the binary runs as /init of the minimal initrd and on
# any rescue system, whatever its libc:
#
#   pkgs.pkgsStatic.callPackage ./agent.nix { }
#
# The unit and QEMU tests are not run here (doCheck = false): the QEMU scenarios need a VM and
# the network, which the Nix sandbox has neither of. Run them with `cargo test` (see README.md).
{
  lib,
  rustPlatform,
}:

let
  root = ../.;
  workspace = lib.importTOML ../Cargo.toml;

  # Only what cargo needs to build the `nixos-kexec` package of the workspace, so that editing
  # the README or the Nix files does not rebuild the agent. Cargo loads the manifests of every
  # workspace member, so the tests crate comes along. The agent embeds the host-flake templates
  # with include_str!, so nix/templates must be part of the source too.
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../agent
      ../tests
      (lib.fileset.maybeMissing ../nix/templates)
      (lib.fileset.maybeMissing ../.cargo)
    ];
  };
in
rustPlatform.buildRustPackage {
  pname = "nixos-kexec";
  version = workspace.workspace.package.version;

  inherit src;

  # Every dependency comes from crates.io (no git sources), so the lock file is all
  # importCargoLock needs; no output hashes to maintain.
  cargoLock.lockFile = ../Cargo.lock;

  cargoBuildFlags = [
    "-p"
    "nixos-kexec"
  ];
  cargoTestFlags = [
    "-p"
    "nixos-kexec"
  ];

  # The tests need QEMU and disk images; they run outside Nix (`cargo test`).
  doCheck = false;

  meta = {
    description = "Installs NixOS from a kexec'd minimal initrd (the agent: /init of the installer and `nixos-kexec run` on the rescue system)";
    license = lib.licenses.mit;
    mainProgram = "nixos-kexec";
    platforms = lib.platforms.linux;
  };
}
