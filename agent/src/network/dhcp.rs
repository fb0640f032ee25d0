//! The installer's network when nobody described it (PXE, a GRUB console): DHCP for IPv4 on
//! every physical NIC that has a link, and IPv6 from router advertisements, which the kernel
//! turns into addresses and a default route itself (SLAAC) once `accept_ra` is on.
//!
//! The DHCP part reuses [`super::apply`]: a runtime-info `Network` with one `dhcp: true`
//! interface per NIC, so the lease is applied exactly as a rescue system's DHCP interface is.

use super::apply::{self, describe_link};
use super::facts::{self, Family, Link, NetworkFacts, Scope};
use super::netlink::{consts::IFA_F_TENTATIVE, Socket};
use super::{choose_link, MacAddr, Prefix};
use crate::input::runtime_info::{Interface, Network};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub struct Options {
    pub apply: apply::Options,
    /// How long a NIC that was just brought up may take to see a link (autonegotiation).
    pub carrier_timeout: Duration,
    /// How long after the links came up to wait for a router advertisement (the kernel
    /// solicits one once its link-local address has passed duplicate address detection).
    pub ra_wait: Duration,
    pub proc_sys_net: PathBuf,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            apply: apply::Options::default(),
            carrier_timeout: Duration::from_secs(6),
            ra_wait: Duration::from_secs(4),
            proc_sys_net: PathBuf::from("/proc/sys/net"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub mac: MacAddr,
    pub ifindex: u32,
    /// As the server gave it.
    pub address: Prefix,
    /// Option 12, when the server sent one.
    pub hostname: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The kernel's view afterwards.
    pub facts: NetworkFacts,
    /// `name mac` of every NIC DHCP was tried on (those with a link).
    pub tried: Vec<String>,
    /// `name mac` of physical NICs left alone because they had no link.
    pub no_carrier: Vec<String>,
    pub leases: Vec<Lease>,
}

impl Outcome {
    /// The MAC of the NIC that got the lease, preferring one with the IPv4 default route.
    pub fn primary_mac(&self) -> Option<MacAddr> {
        let leased: Vec<u32> = self.leases.iter().map(|l| l.ifindex).collect();
        primary_mac(&self.facts, &leased)
    }

    /// The host name the DHCP server gave the primary NIC (or any NIC).
    pub fn hostname(&self) -> Option<String> {
        let primary = self.primary_mac();
        self.leases
            .iter()
            .filter(|l| Some(l.mac) == primary)
            .chain(self.leases.iter())
            .find_map(|l| l.hostname.clone())
    }
}

/// The runtime-info network that asks for DHCP on each of `macs` (once each).
pub fn dhcp_network(macs: &[MacAddr]) -> Network {
    let mut interfaces: Vec<Interface> = Vec::new();
    for &mac in macs {
        if interfaces.iter().any(|i| i.mac == mac) {
            continue;
        }
        interfaces.push(Interface {
            mac,
            dhcp: true,
            ..Interface::default()
        });
    }
    Network {
        interfaces,
        nameservers: Vec::new(),
    }
}

/// The MAC a config URL's `${mac}` means: of a leased NIC carrying the IPv4 default route,
/// else the first leased NIC, else of any NIC carrying a default route (static networks).
pub fn primary_mac(facts: &NetworkFacts, leased: &[u32]) -> Option<MacAddr> {
    let default_oifs = |family: Option<Family>| -> Vec<u32> {
        let mut routes: Vec<&facts::Route> = facts
            .routes
            .iter()
            .filter(|r| r.destination.is_none() && family.is_none_or(|f| r.family == f))
            .collect();
        routes.sort_by_key(|r| r.metric.unwrap_or(0));
        routes.iter().filter_map(|r| r.oif).collect()
    };
    let mac_of = |ifindex: u32| facts.link(ifindex).and_then(|l| l.mac);
    default_oifs(Some(Family::Inet))
        .into_iter()
        .find(|oif| leased.contains(oif))
        .or_else(|| leased.first().copied())
        .or_else(|| default_oifs(Some(Family::Inet)).first().copied())
        .or_else(|| default_oifs(None).first().copied())
        .and_then(mac_of)
}

/// Physical NICs, one link per MAC (on Azure the synthetic NIC, not its VF).
fn candidates(facts: &NetworkFacts) -> Vec<Link> {
    let mut links: Vec<Link> = Vec::new();
    for link in &facts.links {
        let Some(mac) = link.mac else { continue };
        if link.loopback || !link.physical || mac.is_zero() {
            continue;
        }
        if choose_link(facts, mac).is_some_and(|chosen| chosen.ifindex == link.ifindex)
            && !links.iter().any(|l| l.mac == link.mac)
        {
            links.push(link.clone());
        }
    }
    links
}

fn describe(link: &Link) -> String {
    let mac = link.mac.map(|m| m.to_string()).unwrap_or_default();
    format!("{} {mac}", link.name)
}

fn has_carrier(options: &Options, link: &Link) -> bool {
    std::fs::read_to_string(options.apply.sys_class_net.join(&link.name).join("carrier"))
        .is_ok_and(|t| t.trim() == "1")
}

/// The kernel only autoconfigures from router advertisements with `accept_ra` and `autoconf`
/// on (the defaults, unless something turned them off or forwarding is on).
fn accept_router_advertisements(options: &Options, link: &Link) {
    let dir = options.proc_sys_net.join("ipv6/conf").join(&link.name);
    for knob in ["accept_ra", "autoconf"] {
        let path = dir.join(knob);
        if let Err(e) = std::fs::write(&path, "1") {
            log::info!(
                "network: cannot set {} ({e}); IPv6 may be off in this kernel",
                path.display()
            );
        }
    }
}

/// Brings up DHCP and router advertisements on every physical NIC with a link. Finding no
/// lease is not an error here: the caller decides whether anything needs the network.
pub fn bring_up(options: &Options) -> Result<Outcome> {
    let mut socket = Socket::open()?;
    let initial = facts::gather_from(&mut socket, &options.apply.sys_class_net)?;
    if let Some(lo) = initial.links.iter().find(|l| l.loopback) {
        apply::set_up(&mut socket, lo).context("bringing lo up")?;
    }
    let links = candidates(&initial);
    let mut outcome = Outcome::default();
    if links.is_empty() {
        log::info!("network: no network interface with a driver; no DHCP");
        outcome.facts = initial;
        return Ok(outcome);
    }
    for link in &links {
        accept_router_advertisements(options, link);
        apply::set_up(&mut socket, link).with_context(|| format!("bringing {} up", link.name))?;
    }
    let ra_deadline = Instant::now() + options.ra_wait;
    let deadline = Instant::now() + options.carrier_timeout;
    while Instant::now() < deadline && !links.iter().all(|l| has_carrier(options, l)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (with_link, without): (Vec<&Link>, Vec<&Link>) = links.iter().partition(|l| has_carrier(options, l));
    for link in &without {
        log::info!(
            "network: {} has no link after {} s (cable, switch port?); no DHCP there",
            describe(link),
            options.carrier_timeout.as_secs()
        );
        outcome.no_carrier.push(describe(link));
    }
    if with_link.is_empty() {
        outcome.facts = facts::gather_from(&mut socket, &options.apply.sys_class_net)?;
        return Ok(outcome);
    }
    let macs: Vec<MacAddr> = with_link.iter().filter_map(|l| l.mac).collect();
    outcome.tried = with_link.iter().map(|l| describe(l)).collect();
    log::info!("network: DHCP on {}", outcome.tried.join(", "));
    if let Err(e) = apply::apply_with(&dhcp_network(&macs), &options.apply) {
        log::warn!("network: {e:#}");
    }
    for link in &with_link {
        if let Some(address) = apply::dhcp_lease(&options.apply.run_dir, &link.name) {
            outcome.leases.push(Lease {
                name: link.name.clone(),
                mac: link.mac.unwrap_or_default(),
                ifindex: link.ifindex,
                address,
                hostname: apply::dhcp_hostname(&options.apply.run_dir, &link.name),
            });
        }
    }
    for lease in &outcome.leases {
        log::info!(
            "network: {} {} got the DHCP lease {}{}",
            lease.name,
            lease.mac,
            lease.address,
            lease
                .hostname
                .as_deref()
                .map(|h| format!(" with host name {h}"))
                .unwrap_or_default()
        );
    }
    outcome.facts = wait_for_slaac(&mut socket, options, &with_link, ra_deadline)?;
    Ok(outcome)
}

/// IPv6 addresses beyond link-local: what router advertisements bring (global, or site-local
/// fec0::/64 as QEMU's user networking announces). DAD may still be running on them.
fn routable_v6(facts: &NetworkFacts, ifindex: u32) -> Vec<String> {
    facts
        .addresses_of(ifindex)
        .filter(|a| a.family == Family::Inet6 && a.scope < Scope::LINK)
        .map(|a| {
            let mut text = a.prefix().to_string();
            if a.flags & IFA_F_TENTATIVE != 0 {
                text.push_str(" (tentative)");
            }
            text
        })
        .collect()
}

/// Waits until `deadline` at most for router advertisements and says what they brought.
fn wait_for_slaac(
    socket: &mut Socket,
    options: &Options,
    links: &[&Link],
    deadline: Instant,
) -> Result<NetworkFacts> {
    let mut facts = facts::gather_from(socket, &options.apply.sys_class_net)?;
    while Instant::now() < deadline && links.iter().all(|l| routable_v6(&facts, l.ifindex).is_empty()) {
        std::thread::sleep(Duration::from_millis(200));
        facts = facts::gather_from(socket, &options.apply.sys_class_net)?;
    }
    for link in links {
        let addresses = routable_v6(&facts, link.ifindex);
        if addresses.is_empty() {
            log::info!(
                "network: {}: no IPv6 router advertisement within {} s of the link coming up",
                describe(link),
                options.ra_wait.as_secs()
            );
        } else {
            log::info!(
                "network: {}: IPv6 from router advertisements: {}",
                describe(link),
                addresses.join(", ")
            );
            for line in describe_link(&facts, link.ifindex).into_iter().skip(1) {
                log::info!("{line}");
            }
        }
    }
    Ok(facts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::facts::{Protocol, Route};
    use crate::network::test_fixtures::fixture;

    #[test]
    fn one_dhcp_interface_per_mac() {
        let network = dhcp_network(&[
            "52:54:00:AA:00:01".parse().unwrap(),
            "52:54:00:aa:00:02".parse().unwrap(),
            "52:54:00:aa:00:01".parse().unwrap(),
        ]);
        let macs: Vec<String> = network.interfaces.iter().map(|i| i.mac.to_string()).collect();
        assert_eq!(macs, ["52:54:00:aa:00:01", "52:54:00:aa:00:02"]);
        assert!(network
            .interfaces
            .iter()
            .all(|i| i.dhcp && i.addresses.is_empty() && i.routes.is_empty()));
        assert!(network.nameservers.is_empty());
        // What apply checks before it touches anything.
        let json = serde_json::to_vec(&crate::input::runtime_info::RuntimeInfo {
            version: 1,
            network: Some(network),
            ..Default::default()
        })
        .unwrap();
        crate::input::runtime_info::parse_json(&json, crate::input::runtime_info::Source::File, false)
            .unwrap();
    }

    #[test]
    fn candidates_skip_the_azure_vf_and_software_links() {
        let facts = fixture("azure-accelerated");
        let names: Vec<String> = candidates(&facts).into_iter().map(|l| l.name).collect();
        assert_eq!(names, ["eth0"]);
        let facts = fixture("digitalocean");
        let names: Vec<String> = candidates(&facts).into_iter().map(|l| l.name).collect();
        assert_eq!(names, ["eth0", "eth1"]);
    }

    fn default_route(family: Family, oif: u32, metric: u32) -> Route {
        Route {
            family,
            destination: None,
            gateway: None,
            oif: Some(oif),
            protocol: Protocol::DHCP,
            scope: Scope::UNIVERSE,
            onlink: true,
            metric: Some(metric),
        }
    }

    #[test]
    fn primary_mac_prefers_the_leased_nic_with_the_ipv4_default() {
        let mut facts = fixture("digitalocean");
        let eth0 = facts.link_named("eth0").unwrap().clone();
        let eth1 = facts.link_named("eth1").unwrap().clone();
        facts.routes = vec![
            default_route(Family::Inet6, eth0.ifindex, 0),
            default_route(Family::Inet, eth1.ifindex, 0),
        ];
        assert_eq!(primary_mac(&facts, &[eth0.ifindex, eth1.ifindex]), eth1.mac);
        // A lease without the default route still beats a static default elsewhere.
        assert_eq!(primary_mac(&facts, &[eth0.ifindex]), eth0.mac);
        // No lease (static network): the NIC with the IPv4 default route.
        assert_eq!(primary_mac(&facts, &[]), eth1.mac);
        facts.routes.clear();
        assert_eq!(primary_mac(&facts, &[]), None);
    }
}
