//! Rescue side: the running network, as gathered, becomes runtime info's `network`.
//!
//! What is carried over is what nothing else will bring back: static addresses and static
//! routes, per physical NIC, keyed by MAC. What a DHCP server or router advertisements
//! handed out (dynamic addresses, `proto dhcp` / `proto ra` routes) is not frozen into static
//! configuration; the interface is marked `dhcp` instead, so a lease that changes later
//! (a re-assigned cloud IP) cannot leave a stale address behind.

use super::facts::{self, Address, Family, Link, NetworkFacts, Protocol, Route, Scope};
use super::{is_link_local, Destination, MacAddr, Prefix};
use crate::input::runtime_info::{self, Interface, Network};
use anyhow::Result;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// Where systemd-resolved keeps the real upstream servers behind its 127.0.0.53 stub.
pub const UPSTREAM_RESOLV_CONF: &str = "/run/systemd/resolve/resolv.conf";

/// Gathers this machine's network and translates it (the rescue side's one call).
pub fn gather_network() -> Result<Network> {
    let facts = facts::gather()?;
    let nameservers = read_nameservers(Path::new(RESOLV_CONF), Path::new(UPSTREAM_RESOLV_CONF));
    Ok(translate(&facts, nameservers))
}

pub fn translate(facts: &NetworkFacts, nameservers: Vec<IpAddr>) -> Network {
    let mut interfaces: Vec<Interface> = Vec::new();
    let mut chosen: Vec<&Link> = Vec::new();
    for (nic, source) in configurable_nics(facts) {
        let Some(mac) = nic.mac else { continue };
        if chosen.iter().any(|c| c.mac == Some(mac)) {
            continue;
        }
        chosen.push(nic);
        let interface = interface_config(facts, nic, source, mac);
        if interface.addresses.is_empty() && interface.routes.is_empty() && !interface.dhcp {
            log::info!(
                "network: {} has no addresses, routes or DHCP; leaving it out",
                nic.name
            );
            continue;
        }
        interfaces.push(interface);
    }
    if !interfaces
        .iter()
        .any(|i| i.dhcp || i.routes.iter().any(|r| r.to.is_default()))
    {
        log::warn!("network: no interface has a default route or DHCP; the installer will have no way out");
    }
    if nameservers.is_empty() {
        log::warn!("network: no usable nameserver found in {RESOLV_CONF} or {UPSTREAM_RESOLV_CONF}");
    }
    Network {
        interfaces,
        nameservers,
    }
}

/// Physical NICs with the link whose configuration they carry: themselves, or the bridge or
/// bond they are a port of (the installer recreates neither, so the NIC takes the master's
/// addresses). Links enslaved to another physical link (Azure's VF under hv_netvsc, a
/// failover standby) are left out, and among links sharing a MAC the preferred one wins.
fn configurable_nics(facts: &NetworkFacts) -> Vec<(&Link, &Link)> {
    let mut out: Vec<(&Link, &Link)> = Vec::new();
    for link in &facts.links {
        if !link.physical || link.loopback || !has_real_mac(link) {
            continue;
        }
        let Some(master_index) = link.master else {
            out.push((link, link));
            continue;
        };
        let Some(master) = facts.link(master_index) else {
            out.push((link, link));
            continue;
        };
        if master.physical {
            log::info!(
                "network: leaving {} out: it is enslaved to {}{} (an SR-IOV VF or failover \
                 port); {} is configured instead",
                link.name,
                master.name,
                if master.mac == link.mac {
                    " with the same MAC"
                } else {
                    ""
                },
                master.name
            );
            continue;
        }
        if out.iter().any(|(_, source)| source.ifindex == master.ifindex) {
            log::warn!(
                "network: {} is another port of {} ({}); only the first port gets its \
                 configuration, and the {} itself is not recreated",
                link.name,
                master.name,
                master.kind.as_deref().unwrap_or("master"),
                master.kind.as_deref().unwrap_or("master"),
            );
            continue;
        }
        log::warn!(
            "network: {} is a port of {} ({}); the installer configures {}'s addresses on \
             {} directly",
            link.name,
            master.name,
            master.kind.as_deref().unwrap_or("master"),
            master.name,
            link.name
        );
        out.push((link, master));
    }
    // Two unenslaved links with one MAC (a VF before hv_netvsc took it): keep the one
    // `choose_link` would configure.
    let candidates: Vec<u32> = out.iter().map(|(nic, _)| nic.ifindex).collect();
    out.retain(|(nic, _)| {
        let Some(mac) = nic.mac else {
            return false;
        };
        let preferred = super::choose_link(facts, mac)
            .filter(|p| candidates.contains(&p.ifindex))
            .map(|p| p.ifindex)
            .unwrap_or(nic.ifindex);
        if preferred != nic.ifindex {
            log::info!(
                "network: leaving {} out: it shares MAC {mac} with a link preferred over it",
                nic.name
            );
        }
        preferred == nic.ifindex
    });
    out
}

fn has_real_mac(link: &Link) -> bool {
    link.mac.is_some_and(|m| !m.is_zero())
}

fn is_configurable_address(a: &Address) -> bool {
    !a.dynamic
        && a.scope < Scope::LINK
        && !is_link_local(a.address)
        && !a.address.is_loopback()
        && !a.address.is_multicast()
}

fn interface_config(facts: &NetworkFacts, nic: &Link, source: &Link, mac: MacAddr) -> Interface {
    let addresses: Vec<&Address> = facts.addresses_of(source.ifindex).collect();
    let routes: Vec<&Route> = facts.routes_of(source.ifindex).collect();
    let dhcp = addresses.iter().any(|a| {
        a.family == Family::Inet && a.dynamic && a.scope == Scope::UNIVERSE && !is_link_local(a.address)
    }) || routes.iter().any(|r| r.protocol == Protocol::DHCP);

    let static_addresses: Vec<&Address> = addresses
        .iter()
        .copied()
        .filter(|a| is_configurable_address(a))
        .collect();
    // Gateways are judged against the prefixes that will exist before any lease: a gateway
    // only a DHCP prefix covers is marked onlink, which holds before and after the lease.
    let prefixes: Vec<Prefix> = static_addresses.iter().map(|a| a.prefix()).collect();

    // dhclient-script adds the lease's default route without `proto dhcp` (iproute2 calls it
    // boot); on a DHCP interface the IPv4 default is the lease's either way, and a copy
    // frozen into static configuration would outlive a change of gateway.
    let kept: Vec<&Route> = routes
        .iter()
        .copied()
        .filter(|r| keep_route(r))
        .filter(|r| !(dhcp && r.family == Family::Inet && r.destination.is_none()))
        .collect();
    let gateways: Vec<IpAddr> = routes.iter().filter_map(|r| r.gateway).collect();
    let mut out_routes: Vec<runtime_info::Route> = Vec::new();
    for route in kept {
        // "172.31.1.1 dev eth0 scope link" exists only to make a gateway outside every prefix
        // reachable; `onlink` on the routes through it says the same in one route.
        let gateway_host_route = route.gateway.is_none()
            && route
                .destination
                .is_some_and(|d| d.is_host() && gateways.contains(&d.addr));
        if gateway_host_route {
            continue;
        }
        let translated = runtime_info::Route {
            to: route_to(route),
            via: route.gateway,
            onlink: route.onlink
                || route
                    .gateway
                    .is_some_and(|g| gateway_needs_onlink(route, g, &prefixes)),
        };
        if !out_routes.contains(&translated) {
            out_routes.push(translated);
        }
    }
    Interface {
        mac,
        name: Some(nic.name.clone()),
        addresses: static_addresses.iter().map(|a| a.prefix()).collect(),
        routes: out_routes,
        dhcp,
    }
}

/// Routes the kernel, a DHCP client, router advertisements or ICMP redirects made come back
/// by themselves; link-local and multicast destinations are per-link housekeeping.
fn keep_route(route: &Route) -> bool {
    let from_elsewhere =
        [Protocol::KERNEL, Protocol::REDIRECT, Protocol::DHCP, Protocol::RA].contains(&route.protocol);
    let housekeeping = route
        .destination
        .is_some_and(|d| d.addr.is_multicast() || (d.addr.is_ipv6() && d.len >= 10 && is_link_local(d.addr)));
    route.oif.is_some() && !from_elsewhere && !housekeeping && route.scope < Scope::HOST
}

fn route_to(route: &Route) -> Destination {
    let everything = |family: Family| {
        let addr: IpAddr = match family {
            Family::Inet => Ipv4Addr::UNSPECIFIED.into(),
            Family::Inet6 => Ipv6Addr::UNSPECIFIED.into(),
        };
        Destination::Prefix(Prefix::new(addr, 0))
    };
    match (route.destination, route.gateway) {
        (Some(d), _) => Destination::Prefix(d),
        (None, Some(g)) if Family::of(g) != route.family => everything(route.family),
        (None, None) if route.family == Family::Inet6 => everything(Family::Inet6),
        (None, _) => Destination::Default,
    }
}

/// A gateway no static prefix covers is only reachable with onlink; link-local IPv6 gateways
/// (fe80::1) and IPv6 next hops of IPv4 routes are on the link by definition.
fn gateway_needs_onlink(route: &Route, gateway: IpAddr, prefixes: &[Prefix]) -> bool {
    Family::of(gateway) == route.family
        && !is_link_local(gateway)
        && !prefixes.iter().any(|p| p.contains(gateway))
}

/// Nameservers from resolv.conf; when it names only local resolvers (systemd-resolved's
/// 127.0.0.53 stub, a dnsmasq on 127.0.0.1), the upstream ones behind them, because the
/// installer and the fresh system run no such resolver.
pub fn nameservers_from(resolv_conf: &str, upstream: Option<&str>) -> Vec<IpAddr> {
    let parse = |text: &str| -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = Vec::new();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                continue;
            }
            // A zone suffix (fe80::1%eth0) names a link the installed system may call
            // differently, and runtime info has no way to say it.
            if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
        out
    };
    let local = parse(resolv_conf);
    let mut usable: Vec<IpAddr> = local.iter().copied().filter(|ip| !ip.is_loopback()).collect();
    if usable.is_empty() {
        if let Some(upstream) = upstream {
            usable = parse(upstream)
                .into_iter()
                .filter(|ip| !ip.is_loopback())
                .collect();
        }
    }
    usable
}

pub fn read_nameservers(resolv_conf: &Path, upstream: &Path) -> Vec<IpAddr> {
    let resolv = std::fs::read_to_string(resolv_conf).unwrap_or_default();
    let upstream = std::fs::read_to_string(upstream).ok();
    nameservers_from(&resolv, upstream.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::test_fixtures::{fixture, read, route, texts, PROVIDERS};

    fn translated(name: &str) -> Network {
        let nameservers = nameservers_from(
            &read(name, "resolv.conf").unwrap(),
            read(name, "upstream-resolv.conf").as_deref(),
        );
        translate(&fixture(name), nameservers)
    }

    #[test]
    fn hetzner_cloud_dhcp_v4_static_v6_with_link_local_gateway() {
        let net = translated("hetzner-cloud");
        assert_eq!(net.interfaces.len(), 1);
        let eth0 = &net.interfaces[0];
        assert_eq!(eth0.mac.to_string(), "96:00:02:1a:2b:3c");
        assert_eq!(eth0.name.as_deref(), Some("eth0"));
        // The /32 and its 172.31.1.1 pair came from DHCP (dynamic, proto dhcp): DHCP again.
        assert!(eth0.dhcp);
        assert_eq!(texts(&eth0.addresses), ["2001:db8:c0de:1::1/64"]);
        assert_eq!(eth0.routes, [route("default", Some("fe80::1"), false)]);
        assert_eq!(texts(&net.nameservers), ["185.12.64.1", "185.12.64.2"]);
    }

    #[test]
    fn hetzner_static_pair_becomes_one_onlink_default() {
        let facts = fixture("hetzner-cloud-static");
        let net = translate(&facts, vec!["185.12.64.1".parse().unwrap()]);
        let eth0 = &net.interfaces[0];
        assert!(!eth0.dhcp);
        assert_eq!(
            texts(&eth0.addresses),
            ["203.0.113.10/32", "2001:db8:c0de:1::1/64"]
        );
        assert_eq!(
            eth0.routes,
            [
                route("default", Some("172.31.1.1"), true),
                route("default", Some("fe80::1"), false),
            ]
        );
    }

    #[test]
    fn oracle_dhcp_only_with_upstream_nameserver() {
        let net = translated("oracle-cloud");
        assert_eq!(net.interfaces.len(), 1);
        let ens3 = &net.interfaces[0];
        assert_eq!(ens3.mac.to_string(), "02:00:17:05:aa:01");
        assert_eq!(ens3.name.as_deref(), Some("ens3"));
        assert!(ens3.dhcp);
        assert!(ens3.addresses.is_empty());
        // Default, gateway host route and 169.254.0.0/16 all came with the lease.
        assert!(ens3.routes.is_empty());
        // resolv.conf has only systemd-resolved's stub.
        assert_eq!(texts(&net.nameservers), ["169.254.169.254"]);
    }

    #[test]
    fn digitalocean_static_two_nics() {
        let net = translated("digitalocean");
        assert_eq!(net.interfaces.len(), 2);
        let eth0 = &net.interfaces[0];
        assert_eq!(eth0.mac.to_string(), "ae:3c:9d:11:22:01");
        assert!(!eth0.dhcp);
        assert_eq!(
            texts(&eth0.addresses),
            ["203.0.113.50/20", "10.19.0.5/16", "2001:db8:d0:1::4a:1/64"]
        );
        assert_eq!(
            eth0.routes,
            [
                route("default", Some("203.0.113.1"), false),
                route("default", Some("2001:db8:d0:1::1"), false),
            ]
        );
        let eth1 = &net.interfaces[1];
        assert_eq!(eth1.mac.to_string(), "5a:1f:0e:11:22:02");
        assert!(!eth1.dhcp);
        assert_eq!(texts(&eth1.addresses), ["10.114.0.2/20"]);
        assert!(eth1.routes.is_empty());
        assert_eq!(texts(&net.nameservers), ["67.207.67.2", "67.207.67.3"]);
    }

    #[test]
    fn azure_configures_hv_netvsc_and_leaves_the_vf_out() {
        let net = translated("azure-accelerated");
        assert_eq!(net.interfaces.len(), 1, "{net:#?}");
        let eth0 = &net.interfaces[0];
        assert_eq!(eth0.name.as_deref(), Some("eth0"));
        assert_eq!(eth0.mac.to_string(), "00:22:48:6a:1b:2c");
        // Dynamic although its lifetime is infinite, and its routes are proto dhcp.
        assert!(eth0.dhcp);
        assert!(eth0.addresses.is_empty());
        assert!(eth0.routes.is_empty());
        assert_eq!(texts(&net.nameservers), ["168.63.129.16"]);
    }

    /// `runtime-info.json` beside each recording is the runtime info the rescue side wrote
    /// for it before its values were typed: they must write exactly that text, and read it
    /// back unchanged.
    #[test]
    fn every_fixture_translates_to_valid_runtime_info() {
        for name in PROVIDERS.iter().chain(&["hetzner-cloud-static"]) {
            let info = runtime_info::RuntimeInfo {
                version: runtime_info::VERSION,
                network: Some(translated(name)),
                ..Default::default()
            };
            let json = serde_json::to_vec(&info).unwrap();
            let back = runtime_info::parse_json(&json, runtime_info::Source::File, false)
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert_eq!(back, info, "{name}");
            assert_eq!(serde_json::to_vec(&back).unwrap(), json, "{name}");

            let recorded = read(name, "runtime-info.json").unwrap();
            assert_eq!(
                serde_json::to_string_pretty(&info).unwrap() + "\n",
                recorded,
                "{name}"
            );
            let read_back = runtime_info::parse_json(recorded.as_bytes(), runtime_info::Source::File, false)
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert_eq!(read_back, info, "{name}");
        }
    }

    #[test]
    fn gateway_outside_static_prefixes_is_onlink_inside_is_not() {
        let addr = r#"[{"ifindex":2,"ifname":"eth0","flags":["UP"],"link_type":"ether",
            "address":"52:54:00:12:34:56","addr_info":[
              {"family":"inet","local":"192.0.2.10","prefixlen":24,"scope":"global"},
              {"family":"inet6","local":"2001:db8::10","prefixlen":64,"scope":"global"}]}]"#;
        let route4 = r#"[
            {"dst":"default","gateway":"192.0.2.1","dev":"eth0","protocol":"static","flags":[]},
            {"dst":"10.0.0.0/8","gateway":"198.51.100.1","dev":"eth0","protocol":"boot","flags":[]},
            {"dst":"0.0.0.0/0","via":{"family":"inet6","host":"fe80::1"},"dev":"eth0","protocol":"static","metric":5,"flags":[]},
            {"dst":"198.51.100.1","dev":"eth0","protocol":"boot","scope":"link","flags":[]},
            {"dst":"192.0.2.0/24","dev":"eth0","protocol":"kernel","scope":"link","flags":[]}]"#;
        let route6 = r#"[
            {"dst":"2001:db8:1::/48","gateway":"2001:db8:ffff::1","dev":"eth0","protocol":"static","flags":[]},
            {"dst":"default","gateway":"fe80::1","dev":"eth0","protocol":"ra","flags":[]},
            {"dst":"ff00::/8","dev":"eth0","protocol":"boot","flags":[]}]"#;
        let facts = facts::iproute2_json::from_iproute2_json(addr, route4, route6).unwrap();
        let net = translate(&facts, vec![]);
        let eth0 = &net.interfaces[0];
        assert!(!eth0.dhcp);
        assert_eq!(
            eth0.routes,
            [
                route("default", Some("192.0.2.1"), false),
                route("10.0.0.0/8", Some("198.51.100.1"), true),
                route("0.0.0.0/0", Some("fe80::1"), false),
                route("2001:db8:1::/48", Some("2001:db8:ffff::1"), true),
            ]
        );
    }

    #[test]
    fn dhclient_lease_routes_without_proto_dhcp_are_left_to_dhcp() {
        // What Debian's dhclient-script leaves on a Hetzner-like /32 lease: the address with
        // a lifetime, the gateway host route and the default both `proto boot`.
        let addr = r#"[{"ifindex":2,"ifname":"eth0","flags":["UP"],"link_type":"ether",
            "address":"96:00:02:1a:2b:3c","addr_info":[
              {"family":"inet","local":"203.0.113.10","prefixlen":32,"scope":"global",
               "dynamic":true,"valid_life_time":86000,"preferred_life_time":86000}]}]"#;
        let route4 = r#"[
            {"dst":"default","gateway":"172.31.1.1","dev":"eth0","protocol":"boot","flags":[]},
            {"dst":"172.31.1.1","dev":"eth0","protocol":"boot","scope":"link","flags":[]},
            {"dst":"10.50.0.0/16","gateway":"172.31.1.1","dev":"eth0","protocol":"boot","flags":[]}]"#;
        let facts = facts::iproute2_json::from_iproute2_json(addr, route4, "[]").unwrap();
        let net = translate(&facts, vec![]);
        let eth0 = &net.interfaces[0];
        assert!(eth0.dhcp);
        assert!(eth0.addresses.is_empty());
        // A static route through the lease's gateway stays, onlink so it works before the
        // lease too.
        assert_eq!(eth0.routes, [route("10.50.0.0/16", Some("172.31.1.1"), true)]);
    }

    #[test]
    fn bridge_port_takes_the_bridges_configuration() {
        let addr = r#"[
            {"ifindex":2,"ifname":"eno1","flags":["UP"],"link_type":"ether","master":"vmbr0",
             "address":"52:54:00:12:34:56","addr_info":[]},
            {"ifindex":3,"ifname":"vmbr0","flags":["UP"],"link_type":"ether",
             "linkinfo":{"info_kind":"bridge"},"address":"52:54:00:12:34:56","addr_info":[
              {"family":"inet","local":"192.0.2.10","prefixlen":24,"scope":"global"}]}]"#;
        let route4 =
            r#"[{"dst":"default","gateway":"192.0.2.1","dev":"vmbr0","protocol":"boot","flags":[]}]"#;
        let facts = facts::iproute2_json::from_iproute2_json(addr, route4, "[]").unwrap();
        let net = translate(&facts, vec![]);
        assert_eq!(net.interfaces.len(), 1);
        let nic = &net.interfaces[0];
        assert_eq!(nic.name.as_deref(), Some("eno1"));
        assert_eq!(texts(&nic.addresses), ["192.0.2.10/24"]);
        assert_eq!(nic.routes, [route("default", Some("192.0.2.1"), false)]);
    }

    #[test]
    fn nameservers_skip_local_resolvers_and_junk() {
        let stub = "# comment\nnameserver 127.0.0.53\noptions edns0\n";
        let upstream = "nameserver 9.9.9.9\nnameserver 2620:fe::fe\nnameserver 9.9.9.9\n";
        assert_eq!(
            texts(&nameservers_from(stub, Some(upstream))),
            ["9.9.9.9", "2620:fe::fe"]
        );
        assert!(nameservers_from(stub, None).is_empty());
        let mixed = "nameserver 127.0.0.1\nnameserver 1.1.1.1\nnameserver fe80::1%eth0\nnameserver bogus\n";
        assert_eq!(texts(&nameservers_from(mixed, Some(upstream))), ["1.1.1.1"]);
        assert!(nameservers_from("", None).is_empty());
    }
}
