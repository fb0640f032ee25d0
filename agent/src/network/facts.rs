//! The running system's network as the kernel sees it: links, addresses, routes.
//!
//! [`gather`] asks the kernel over rtnetlink (plus sysfs for drivers). Tests fill the same
//! struct from recorded provider shapes instead (`iproute2_json`, test-only).

use super::netlink::{self, consts::*, IfAddr, IfInfo, RtMsg, Socket};
use super::{MacAddr, Prefix};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::Path;

#[cfg(test)]
pub(crate) mod iproute2_json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Inet,
    Inet6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::Inet,
            IpAddr::V6(_) => Family::Inet6,
        }
    }

    fn from_af(af: u8) -> Option<Family> {
        match af {
            AF_INET => Some(Family::Inet),
            AF_INET6 => Some(Family::Inet6),
            _ => None,
        }
    }
}

/// `rtm_scope` / `ifa_scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Scope(pub u8);

impl Scope {
    pub const UNIVERSE: Scope = Scope(0);
    pub const SITE: Scope = Scope(200);
    pub const LINK: Scope = Scope(253);
    pub const HOST: Scope = Scope(254);
    pub const NOWHERE: Scope = Scope(255);

    const NAMES: [(Scope, &'static str); 5] = [
        (Scope::UNIVERSE, "global"),
        (Scope::SITE, "site"),
        (Scope::LINK, "link"),
        (Scope::HOST, "host"),
        (Scope::NOWHERE, "nowhere"),
    ];

    pub fn name(self) -> String {
        Self::NAMES
            .iter()
            .find(|(s, _)| *s == self)
            .map(|(_, n)| n.to_string())
            .unwrap_or_else(|| self.0.to_string())
    }
}

/// `rtm_protocol`: who put a route there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Protocol(pub u8);

impl Protocol {
    pub const UNSPEC: Protocol = Protocol(0);
    pub const REDIRECT: Protocol = Protocol(1);
    pub const KERNEL: Protocol = Protocol(2);
    pub const BOOT: Protocol = Protocol(3);
    pub const STATIC: Protocol = Protocol(4);
    pub const RA: Protocol = Protocol(9);
    pub const DHCP: Protocol = Protocol(16);

    /// `/usr/share/iproute2/rt_protos` as iproute2 ships it.
    const NAMES: [(u8, &'static str); 21] = [
        (1, "redirect"),
        (2, "kernel"),
        (3, "boot"),
        (4, "static"),
        (8, "gated"),
        (9, "ra"),
        (10, "mrt"),
        (11, "zebra"),
        (12, "bird"),
        (13, "dnrouted"),
        (14, "xorp"),
        (15, "ntk"),
        (16, "dhcp"),
        (18, "keepalived"),
        (42, "babel"),
        (99, "openr"),
        (186, "bgp"),
        (187, "isis"),
        (188, "ospf"),
        (189, "rip"),
        (192, "eigrp"),
    ];

    pub fn name(self) -> String {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == self.0)
            .map(|(_, name)| name.to_string())
            .unwrap_or_else(|| self.0.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    pub altnames: Vec<String>,
    /// `None` for links without an Ethernet address (tunnels, InfiniBand).
    pub mac: Option<MacAddr>,
    pub loopback: bool,
    pub up: bool,
    pub mtu: Option<u32>,
    /// `IFLA_INFO_KIND` of software links ("bridge", "bond", "veth", ...); `None` for hardware.
    pub kind: Option<String>,
    /// Driver bound to the device (`/sys/class/net/X/device/driver`).
    pub driver: Option<String>,
    /// Kernel module of that driver (`.../driver/module`); absent for built-in drivers.
    pub module: Option<String>,
    /// `IFLA_MASTER`: the bridge, bond or (on Azure) synthetic NIC this link is enslaved to.
    pub master: Option<u32>,
    /// Backed by a device (`/sys/class/net/X/device` exists): a NIC rather than software.
    pub physical: bool,
    /// An SR-IOV virtual function (`device/physfn` exists; only seen where the PF is visible).
    pub virtual_function: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub ifindex: u32,
    pub family: Family,
    pub address: IpAddr,
    pub prefix: u8,
    pub scope: Scope,
    /// Handed out with a lifetime (DHCP, SLAAC) rather than configured for good: no
    /// `IFA_F_PERMANENT`, or a finite valid lifetime.
    pub dynamic: bool,
    /// Raw `IFA_FLAGS`, e.g. to see that DAD was skipped (`IFA_F_NODAD`) or still runs.
    pub flags: u32,
}

impl Address {
    pub fn prefix(&self) -> Prefix {
        Prefix::new(self.address, self.prefix)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub family: Family,
    /// `None` for the default route.
    pub destination: Option<Prefix>,
    /// `RTA_GATEWAY`, or `RTA_VIA` for an IPv4 route through an IPv6 gateway (RFC 5549), so
    /// it can be of the other family.
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub protocol: Protocol,
    pub scope: Scope,
    /// `RTNH_F_ONLINK`: the gateway is on the link even though no prefix covers it.
    pub onlink: bool,
    pub metric: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkFacts {
    pub links: Vec<Link>,
    pub addresses: Vec<Address>,
    /// Unicast routes of the main table.
    pub routes: Vec<Route>,
}

impl NetworkFacts {
    pub fn link(&self, ifindex: u32) -> Option<&Link> {
        self.links.iter().find(|l| l.ifindex == ifindex)
    }

    pub fn link_named(&self, name: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.name == name)
    }

    pub fn addresses_of(&self, ifindex: u32) -> impl Iterator<Item = &Address> {
        self.addresses.iter().filter(move |a| a.ifindex == ifindex)
    }

    pub fn routes_of(&self, ifindex: u32) -> impl Iterator<Item = &Route> {
        self.routes.iter().filter(move |r| r.oif == Some(ifindex))
    }
}

/// Reads the running system's network from the kernel (rtnetlink) and sysfs.
pub fn gather() -> Result<NetworkFacts> {
    let mut socket = Socket::open()?;
    gather_from(&mut socket, Path::new("/sys/class/net"))
}

pub(crate) fn gather_from(socket: &mut Socket, sys_class_net: &Path) -> Result<NetworkFacts> {
    let mut links = Vec::new();
    for message in socket
        .dump(netlink::getlink_dump(), RTM_NEWLINK)
        .context("listing network links (RTM_GETLINK)")?
    {
        if let Some(mut link) = parse_link(&message.payload) {
            read_sysfs(&mut link, sys_class_net);
            links.push(link);
        }
    }
    let addresses = socket
        .dump(netlink::getaddr_dump(), RTM_NEWADDR)
        .context("listing addresses (RTM_GETADDR)")?
        .iter()
        .filter_map(|m| parse_address(&m.payload))
        .collect();
    let mut routes = Vec::new();
    for family in [AF_INET, AF_INET6] {
        for message in socket
            .dump(netlink::getroute_dump(family), RTM_NEWROUTE)
            .context("listing routes (RTM_GETROUTE)")?
        {
            routes.extend(parse_route(&message.payload));
        }
    }
    links.sort_by_key(|l| l.ifindex);
    Ok(NetworkFacts {
        links,
        addresses,
        routes,
    })
}

pub(crate) fn parse_link(payload: &[u8]) -> Option<Link> {
    let info = IfInfo::parse(payload)?;
    let mut link = Link {
        ifindex: u32::try_from(info.index).ok()?,
        name: String::new(),
        altnames: Vec::new(),
        mac: None,
        loopback: info.flags & IFF_LOOPBACK != 0 || info.link_type == ARPHRD_LOOPBACK,
        up: info.flags & IFF_UP != 0,
        mtu: None,
        kind: None,
        driver: None,
        module: None,
        master: None,
        physical: false,
        virtual_function: false,
    };
    for (kind, value) in netlink::attrs(payload.get(IfInfo::LEN..)?) {
        match kind {
            IFLA_IFNAME => link.name = netlink::str_of(value),
            IFLA_ADDRESS => link.mac = MacAddr::from_bytes(value),
            IFLA_MTU => link.mtu = netlink::u32_of(value),
            IFLA_MASTER => link.master = netlink::u32_of(value).filter(|&m| m != 0),
            IFLA_LINKINFO => {
                link.kind = netlink::attrs(value)
                    .find(|(k, _)| *k == IFLA_INFO_KIND)
                    .map(|(_, v)| netlink::str_of(v));
            }
            IFLA_PROP_LIST => {
                link.altnames = netlink::attrs(value)
                    .filter(|(k, _)| *k == IFLA_ALT_IFNAME)
                    .map(|(_, v)| netlink::str_of(v))
                    .collect();
            }
            _ => {}
        }
    }
    (!link.name.is_empty()).then_some(link)
}

fn read_sysfs(link: &mut Link, sys_class_net: &Path) {
    let device = sys_class_net.join(&link.name).join("device");
    link.physical = device.exists();
    link.virtual_function = device.join("physfn").exists();
    let base_name = |path: &Path| {
        std::fs::read_link(path)
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
    };
    link.driver = base_name(&device.join("driver"));
    link.module = base_name(&device.join("driver/module"));
}

pub(crate) fn parse_address(payload: &[u8]) -> Option<Address> {
    let header = IfAddr::parse(payload)?;
    let family = Family::from_af(header.family)?;
    let mut local = None;
    let mut address = None;
    let mut flags = header.flags as u32;
    let mut valid_lifetime = INFINITY_LIFE_TIME;
    for (kind, value) in netlink::attrs(payload.get(IfAddr::LEN..)?) {
        match kind {
            IFA_LOCAL => local = netlink::parse_ip(value),
            IFA_ADDRESS => address = netlink::parse_ip(value),
            IFA_FLAGS => flags = netlink::u32_of(value).unwrap_or(flags),
            // struct ifa_cacheinfo { ifa_prefered, ifa_valid, cstamp, tstamp }
            IFA_CACHEINFO => {
                valid_lifetime = value
                    .get(4..8)
                    .and_then(netlink::u32_of)
                    .unwrap_or(INFINITY_LIFE_TIME)
            }
            _ => {}
        }
    }
    // On point-to-point links IFA_ADDRESS is the peer; IFA_LOCAL is always our own.
    let ip = local.or(address)?;
    Some(Address {
        ifindex: header.index,
        family,
        address: ip,
        prefix: header.prefix_len,
        scope: Scope(header.scope),
        dynamic: flags & IFA_F_PERMANENT == 0 || valid_lifetime != INFINITY_LIFE_TIME,
        flags,
    })
}

/// One `RTM_NEWROUTE` becomes one route per next hop; routes outside the main table, of
/// other types (local, broadcast, unreachable) and cached clones are left out.
pub(crate) fn parse_route(payload: &[u8]) -> Vec<Route> {
    let Some(header) = RtMsg::parse(payload) else {
        return Vec::new();
    };
    let Some(family) = Family::from_af(header.family) else {
        return Vec::new();
    };
    let mut table = header.table as u32;
    let mut destination = None;
    let mut gateway = None;
    let mut oif = None;
    let mut metric = None;
    let mut multipath = Vec::new();
    for (kind, value) in netlink::attrs(payload.get(RtMsg::LEN..).unwrap_or(&[])) {
        match kind {
            RTA_TABLE => table = netlink::u32_of(value).unwrap_or(table),
            RTA_DST => destination = netlink::parse_ip(value),
            RTA_GATEWAY => gateway = netlink::parse_ip(value),
            RTA_VIA => gateway = netlink::parse_via(value),
            RTA_OIF => oif = netlink::u32_of(value),
            RTA_PRIORITY => metric = netlink::u32_of(value),
            RTA_MULTIPATH => multipath = parse_nexthops(value),
            _ => {}
        }
    }
    if table != RT_TABLE_MAIN as u32
        || header.kind != RTN_UNICAST
        || header.flags & RTM_F_CLONED != 0
        // Source-specific IPv6 routes would need the source too; rescue systems have none.
        || header.src_len != 0
    {
        return Vec::new();
    }
    let destination = match destination {
        Some(ip) if header.dst_len > 0 || !ip.is_unspecified() => Some(Prefix::new(ip, header.dst_len)),
        _ if header.dst_len > 0 => return Vec::new(),
        _ => None,
    };
    let route = Route {
        family,
        destination,
        gateway,
        oif,
        protocol: Protocol(header.protocol),
        scope: Scope(header.scope),
        onlink: header.flags & RTNH_F_ONLINK != 0,
        metric,
    };
    if multipath.is_empty() {
        return vec![route];
    }
    multipath
        .into_iter()
        .map(|hop| Route {
            gateway: hop.gateway,
            oif: Some(hop.ifindex),
            onlink: route.onlink || hop.flags & RTNH_F_ONLINK as u8 != 0,
            ..route.clone()
        })
        .collect()
}

struct NextHop {
    ifindex: u32,
    flags: u8,
    gateway: Option<IpAddr>,
}

/// `struct rtnexthop { len: u16, flags: u8, hops: u8, ifindex: i32 }` followed by attributes.
fn parse_nexthops(mut bytes: &[u8]) -> Vec<NextHop> {
    let mut hops = Vec::new();
    while bytes.len() >= 8 {
        let len = u16::from_ne_bytes([bytes[0], bytes[1]]) as usize;
        if len < 8 || len > bytes.len() {
            break;
        }
        let mut hop = NextHop {
            ifindex: u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            flags: bytes[2],
            gateway: None,
        };
        for (kind, value) in netlink::attrs(&bytes[8..len]) {
            match kind {
                RTA_GATEWAY => hop.gateway = netlink::parse_ip(value),
                RTA_VIA => hop.gateway = netlink::parse_via(value),
                _ => {}
            }
        }
        hops.push(hop);
        bytes = bytes.get(netlink::align(len)..).unwrap_or(&[]);
    }
    hops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::netlink::Builder;

    fn link_message(index: i32, name: &str, mac: &[u8], master: Option<u32>) -> Vec<u8> {
        let mut b = Builder::new(RTM_NEWLINK, 0)
            .fixed(
                &IfInfo {
                    family: 0,
                    link_type: 1,
                    index,
                    flags: IFF_UP,
                    change: 0,
                }
                .to_bytes(),
            )
            .attr_str(IFLA_IFNAME, name)
            .attr(IFLA_ADDRESS, mac)
            .attr_u32(IFLA_MTU, 1500)
            .begin_nested(IFLA_PROP_LIST)
            .attr_str(IFLA_ALT_IFNAME, "enp1s0")
            .end_nested();
        if let Some(m) = master {
            b = b.attr_u32(IFLA_MASTER, m);
        }
        b.finish(1)[NLMSG_HDRLEN..].to_vec()
    }

    #[test]
    fn decodes_link_messages() {
        let link = parse_link(&link_message(2, "eth0", &[0x96, 0, 2, 0x1a, 0x2b, 0x3c], Some(5))).unwrap();
        assert_eq!(link.ifindex, 2);
        assert_eq!(link.name, "eth0");
        assert_eq!(link.mac, Some(MacAddr([0x96, 0, 2, 0x1a, 0x2b, 0x3c])));
        assert_eq!(link.altnames, ["enp1s0"]);
        assert_eq!(link.master, Some(5));
        assert_eq!(link.mtu, Some(1500));
        assert!(link.up && !link.loopback);
        assert!(parse_link(&[0; 4]).is_none());
    }

    #[test]
    fn decodes_address_messages() {
        let message = |flags: u32, valid: u32| {
            let mut cache = vec![0u8; 16];
            cache[4..8].copy_from_slice(&valid.to_ne_bytes());
            Builder::new(RTM_NEWADDR, 0)
                .fixed(
                    &IfAddr {
                        family: AF_INET6,
                        prefix_len: 64,
                        flags: 0,
                        scope: 0,
                        index: 2,
                    }
                    .to_bytes(),
                )
                .attr_ip(IFA_ADDRESS, "2001:db8::2".parse().unwrap())
                .attr_u32(IFA_FLAGS, flags)
                .attr(IFA_CACHEINFO, &cache)
                .finish(1)[NLMSG_HDRLEN..]
                .to_vec()
        };
        let permanent = parse_address(&message(IFA_F_PERMANENT, INFINITY_LIFE_TIME)).unwrap();
        assert_eq!(permanent.address.to_string(), "2001:db8::2");
        assert_eq!((permanent.prefix, permanent.family), (64, Family::Inet6));
        assert!(!permanent.dynamic);
        assert!(parse_address(&message(0, INFINITY_LIFE_TIME)).unwrap().dynamic);
        assert!(parse_address(&message(IFA_F_PERMANENT, 3600)).unwrap().dynamic);
    }

    #[test]
    fn decodes_route_messages() {
        let rtmsg = |table: u8, kind: u8, flags: u32| RtMsg {
            family: AF_INET,
            dst_len: 0,
            table,
            protocol: 16,
            scope: 0,
            kind,
            flags,
            ..RtMsg::default()
        };
        let route = |header: RtMsg| {
            Builder::new(RTM_NEWROUTE, 0)
                .fixed(&header.to_bytes())
                .attr_u32(RTA_TABLE, header.table as u32)
                .attr(RTA_VIA, &netlink::via_bytes("fe80::1".parse().unwrap()))
                .attr_u32(RTA_OIF, 2)
                .attr_u32(RTA_PRIORITY, 100)
                .finish(1)[NLMSG_HDRLEN..]
                .to_vec()
        };
        let parsed = parse_route(&route(rtmsg(RT_TABLE_MAIN, RTN_UNICAST, RTNH_F_ONLINK)));
        assert_eq!(parsed.len(), 1);
        let r = &parsed[0];
        assert_eq!(r.destination, None);
        assert_eq!(r.gateway.unwrap().to_string(), "fe80::1");
        assert_eq!((r.oif, r.metric, r.onlink), (Some(2), Some(100), true));
        assert_eq!(r.protocol, Protocol::DHCP);
        assert!(parse_route(&route(rtmsg(255, RTN_UNICAST, 0))).is_empty());
        assert!(parse_route(&route(rtmsg(RT_TABLE_MAIN, 2, 0))).is_empty());
        assert!(parse_route(&route(rtmsg(RT_TABLE_MAIN, RTN_UNICAST, RTM_F_CLONED))).is_empty());
    }

    #[test]
    fn decodes_multipath_routes() {
        let mut hops = Vec::new();
        for (index, gw) in [(2u32, "192.0.2.1"), (3, "192.0.2.2")] {
            let attrs = Builder::new(0, 0)
                .attr_ip(RTA_GATEWAY, gw.parse().unwrap())
                .finish(0)[NLMSG_HDRLEN..]
                .to_vec();
            let len = (8 + attrs.len()) as u16;
            hops.extend(len.to_ne_bytes());
            hops.extend([0u8, 0]);
            hops.extend(index.to_ne_bytes());
            hops.extend(attrs);
        }
        let payload = Builder::new(RTM_NEWROUTE, 0)
            .fixed(
                &RtMsg {
                    family: AF_INET,
                    dst_len: 8,
                    table: RT_TABLE_MAIN,
                    kind: RTN_UNICAST,
                    ..RtMsg::default()
                }
                .to_bytes(),
            )
            .attr_ip(RTA_DST, "10.0.0.0".parse().unwrap())
            .attr(RTA_MULTIPATH, &hops)
            .finish(1)[NLMSG_HDRLEN..]
            .to_vec();
        let routes = parse_route(&payload);
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].destination.unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(routes[1].oif, Some(3));
        assert_eq!(routes[1].gateway.unwrap().to_string(), "192.0.2.2");
    }

    /// Reads this machine's own network over netlink. Fails, never skips, when netlink is not
    /// there: a gather that cannot run must not look like one that passed.
    #[test]
    fn gathers_the_hosts_loopback_over_netlink() {
        let facts = gather().expect("rtnetlink must work here");
        let lo = facts.links.iter().find(|l| l.loopback).expect("a loopback link");
        assert_eq!(lo.name, "lo");
        assert!(!lo.physical);
        let v4: Vec<String> = facts
            .addresses_of(lo.ifindex)
            .filter(|a| a.family == Family::Inet)
            .map(|a| a.prefix().to_string())
            .collect();
        assert!(v4.contains(&"127.0.0.1/8".to_string()), "{v4:?}");
        assert!(facts.addresses_of(lo.ifindex).all(|a| !a.dynamic));
        // A container without networking has an empty main table, so only its shape is checked.
        assert!(facts.routes.iter().all(|r| r.oif.is_some()));
    }
}
