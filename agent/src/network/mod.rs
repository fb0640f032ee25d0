//! The network on both sides of the kexec.
//!
//! - [`facts`]: what the running kernel has (rtnetlink + sysfs, or recorded `ip -j` JSON).
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

use facts::{Link, NetworkFacts};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;

/// An address with prefix length; also a route destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// Clamps the length to the family's width so that `contains` cannot overflow.
    pub fn new(addr: IpAddr, len: u8) -> Prefix {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        Prefix {
            addr,
            len: len.min(max),
        }
    }

    pub fn parse_cidr(text: &str) -> Option<Prefix> {
        let (addr, len) = text.split_once('/')?;
        let addr: IpAddr = addr.parse().ok()?;
        let len: u8 = len.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(Prefix { addr, len })
    }

    /// iproute2 prints host routes without a length.
    pub fn parse_host_or_cidr(text: &str) -> Option<Prefix> {
        if text.contains('/') {
            return Prefix::parse_cidr(text);
        }
        let addr: IpAddr = text.parse().ok()?;
        Some(Prefix::new(addr, if addr.is_ipv4() { 32 } else { 128 }))
    }

    pub fn is_host(&self) -> bool {
        self.len == if self.addr.is_ipv4() { 32 } else { 128 }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.len as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.len as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

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
pub fn choose_link<'a>(facts: &'a NetworkFacts, mac: &str) -> Option<&'a Link> {
    let mac = mac.to_ascii_lowercase();
    let twins: Vec<&Link> = facts
        .links
        .iter()
        .filter(|l| !l.loopback && l.mac.as_deref() == Some(mac.as_str()))
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
pub fn mac_is_shared(facts: &NetworkFacts, mac: &str) -> bool {
    let mac = mac.to_ascii_lowercase();
    facts
        .links
        .iter()
        .filter(|l| !l.loopback && l.mac.as_deref() == Some(mac.as_str()))
        .count()
        > 1
}

#[cfg(test)]
pub(crate) mod test_fixtures {
    use super::facts::{from_iproute2_json, NetworkFacts};
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
    fn prefixes_contain_what_they_should() {
        let p = Prefix::parse_cidr("10.0.0.0/24").unwrap();
        assert!(p.contains("10.0.0.1".parse().unwrap()));
        assert!(!p.contains("10.0.1.1".parse().unwrap()));
        assert!(!p.contains("::1".parse().unwrap()));
        let host = Prefix::parse_cidr("203.0.113.10/32").unwrap();
        assert!(host.is_host());
        assert!(!host.contains("172.31.1.1".parse().unwrap()));
        let all = Prefix::parse_cidr("::/0").unwrap();
        assert!(all.contains("2001:db8::1".parse().unwrap()));
        let v6 = Prefix::parse_cidr("2001:db8:c0de:1::1/64").unwrap();
        assert!(v6.contains("2001:db8:c0de:1::ffff".parse().unwrap()));
        assert!(!v6.contains("2001:db8:c0de:2::1".parse().unwrap()));
        assert_eq!(Prefix::parse_cidr("10.0.0.0/33"), None);
        assert_eq!(Prefix::parse_cidr("10.0.0.0"), None);
        assert_eq!(
            Prefix::parse_host_or_cidr("172.31.1.1").unwrap().to_string(),
            "172.31.1.1/32"
        );
        assert_eq!(Prefix::new("::".parse().unwrap(), 200).len, 128);
    }

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
        let mac = "00:22:48:6A:1B:2C";
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
        assert_eq!(choose_link(&facts, "5a:1f:0e:11:22:02").unwrap().name, "eth1");
        assert!(!mac_is_shared(&facts, "5a:1f:0e:11:22:02"));
        assert!(choose_link(&facts, "52:54:00:00:00:01").is_none());
        // lo's all-zero MAC never matches.
        assert!(choose_link(&facts, "00:00:00:00:00:00").is_none());
    }
}
