//! The network on both sides of the kexec.
//!
//! - [`types`]: MAC addresses, prefixes and route destinations, as runtime info writes them.
//! - [`facts`]: what the running kernel has (rtnetlink + sysfs; tests read recorded `ip -j`
//!   JSON instead).
//! - [`translate`]: facts + resolv.conf -> runtime info `network` (rescue side).
//! - [`apply`]: runtime info `network` -> links, addresses, routes, DHCP, resolv.conf
//!   (installer side, before anything needs the network).
//! - [`dhcp`]: no runtime info `network` (PXE, GRUB console): DHCP and router advertisements
//!   on every physical NIC with a link.
//! - [`nixos`]: runtime info `network` -> `network.nix` for the installed system.
//!
//! Interfaces travel by MAC address only: the kernels on either side of the kexec, and the
//! installed system's, may all name the same NIC differently.
//!
//! Meaning of runtime-info routes as this module writes and reads them: `to` is `default` or
//! a CIDR; a `default` route takes its family from `via` (IPv4 without `via`); an IPv4
//! default through an IPv6 gateway is written `0.0.0.0/0` so its family stays explicit.

pub mod apply;
pub mod dhcp;
pub mod facts;
pub mod netlink;
pub mod nixos;
pub mod translate;
pub mod types;

pub use types::{Destination, MacAddr, Prefix};

use facts::{Link, NetworkFacts};
use std::net::IpAddr;

/// fe80::/10 and 169.254.0.0/16: valid on one link only, made up again by every kernel.
pub fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// Which of the links carrying `mac` to configure.
///
/// Several links can share a MAC: on Azure with accelerated networking the SR-IOV VF
/// (mlx4/mlx5/mana) has the synthetic hv_netvsc NIC's MAC and is enslaved to it; with
/// virtio-net failover the standby and the VF are enslaved to a failover master. The one to
/// configure is the master, never a link enslaved to a twin. Before hv_netvsc has enslaved
/// its VF (it does so a moment after the VF appears) the driver decides.
pub fn choose_link(facts: &NetworkFacts, mac: MacAddr) -> Option<&Link> {
    let twins: Vec<&Link> = facts
        .links
        .iter()
        .filter(|l| !l.loopback && l.mac == Some(mac))
        .collect();
    twins.iter().copied().min_by_key(|l| {
        let enslaved_to_twin = l.master.is_some_and(|m| twins.iter().any(|t| t.ifindex == m));
        let master_of_twin = twins.iter().any(|t| t.master == Some(l.ifindex));
        (
            enslaved_to_twin,
            l.virtual_function,
            !master_of_twin,
            l.driver.as_deref() != Some("hv_netvsc"),
            !l.physical,
            l.master.is_some(),
            l.ifindex,
        )
    })
}

/// Whether `mac` is carried by more than one link, as on Azure, so that name-free matching
/// in the installed system needs the driver too.
pub fn mac_is_shared(facts: &NetworkFacts, mac: MacAddr) -> bool {
    facts
        .links
        .iter()
        .filter(|l| !l.loopback && l.mac == Some(mac))
        .count()
        > 1
}

#[cfg(test)]
pub(crate) mod test_fixtures {
    use super::facts::iproute2_json::from_iproute2_json;
    use super::facts::NetworkFacts;
    use crate::input::runtime_info;
    use std::path::PathBuf;

    pub const PROVIDERS: [&str; 4] = [
        "hetzner-cloud",
        "oracle-cloud",
        "digitalocean",
        "azure-accelerated",
    ];

    pub fn dir(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/network")
            .join(name)
    }

    pub fn read(name: &str, file: &str) -> Option<String> {
        std::fs::read_to_string(dir(name).join(file)).ok()
    }

    /// Values as text, to compare with what runtime info writes.
    pub fn texts(values: &[impl ToString]) -> Vec<String> {
        values.iter().map(ToString::to_string).collect()
    }

    pub fn route(to: &str, via: Option<&str>, onlink: bool) -> runtime_info::Route {
        runtime_info::Route {
            to: to.parse().unwrap(),
            via: via.map(|v| v.parse().unwrap()),
            onlink,
        }
    }

    /// A recorded provider shape, with the drivers its NOTES.md names (iproute2's JSON has
    /// no sysfs view).
    pub fn fixture(name: &str) -> NetworkFacts {
        let file = |f: &str| read(name, f).unwrap_or_else(|| panic!("fixture {name}/{f}"));
        let mut facts = from_iproute2_json(
            &file("ip-addr.json"),
            &file("ip-route4.json"),
            &file("ip-route6.json"),
        )
        .unwrap();
        for link in facts.links.iter_mut().filter(|l| l.physical) {
            let driver = match (name, link.name.as_str()) {
                ("azure-accelerated", "eth0") => "hv_netvsc",
                ("azure-accelerated", _) => "mlx5_core",
                _ => "virtio_net",
            };
            link.driver = Some(driver.into());
            link.module = Some(driver.into());
        }
        facts
    }
}

#[cfg(test)]
mod tests {
    use super::test_fixtures::fixture;
    use super::*;

    #[test]
    fn link_local_covers_both_families() {
        for ip in ["fe80::1", "febf::1", "169.254.169.254"] {
            assert!(is_link_local(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["fec0::1", "2001:db8::1", "10.0.0.1"] {
            assert!(!is_link_local(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn azure_mac_chooses_the_synthetic_nic_not_the_vf() {
        let mut facts = fixture("azure-accelerated");
        let mac: MacAddr = "00:22:48:6A:1B:2C".parse().unwrap();
        assert!(mac_is_shared(&facts, mac));
        assert_eq!(choose_link(&facts, mac).unwrap().name, "eth0");

        // The same once the VF is no longer enslaved (it appears before hv_netvsc takes it):
        // the driver decides, whatever the ifindex order.
        for link in &mut facts.links {
            link.master = None;
        }
        facts.links.reverse();
        for (i, link) in facts.links.iter_mut().enumerate() {
            link.ifindex = i as u32 + 1;
        }
        assert_eq!(choose_link(&facts, mac).unwrap().name, "eth0");

        // And without any driver knowledge, from the enslavement alone.
        let mut bare = fixture("azure-accelerated");
        for link in &mut bare.links {
            link.driver = None;
        }
        assert_eq!(choose_link(&bare, mac).unwrap().name, "eth0");
    }

    #[test]
    fn a_unique_mac_is_simply_found_and_a_missing_one_is_not() {
        let facts = fixture("digitalocean");
        let mac = |text: &str| text.parse::<MacAddr>().unwrap();
        assert_eq!(
            choose_link(&facts, mac("5a:1f:0e:11:22:02")).unwrap().name,
            "eth1"
        );
        assert!(!mac_is_shared(&facts, mac("5a:1f:0e:11:22:02")));
        assert!(choose_link(&facts, mac("52:54:00:00:00:01")).is_none());
        // lo's all-zero MAC never matches.
        assert!(choose_link(&facts, MacAddr::default()).is_none());
    }
}
