# TEST DOUBLE for nixpkgs' profiles/qemu-guest.nix (see ../../../flake.nix): the virtio drivers
# in the initrd, as the real profile puts them there.
{ ... }:
{
  boot.initrd.availableKernelModules = [ "virtio_net" "virtio_pci" "virtio_mmio" "virtio_blk" "virtio_scsi" ];
}
