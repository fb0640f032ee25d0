# The network of this machine. nixos-kexec wrote it from what the system it was installed from
# had configured; it is yours to edit.
#
# Interfaces are matched by MAC address, not by name: the installed kernel may name a NIC
# differently (eth0, ens3, enp1s0) from the system that recorded it.
{ ... }:

{
  networking.useNetworkd = true;
  networking.useDHCP = false;

  # Also written to /etc/resolv.conf, so DNS works whether or not systemd-resolved (which
  # the per-interface `dns` below feeds) is enabled.
  networking.nameservers = [
    /*@nameservers@*/
  ];

  systemd.network.networks = {
    /*@networks@*/
  };
}
