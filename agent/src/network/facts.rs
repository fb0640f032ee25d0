//! The running system's network as the kernel sees it: links, addresses, routes.
//!
//! Two sources fill the same struct: [`gather`] asks the kernel over rtnetlink (plus sysfs for
//! drivers), [`from_iproute2_json`] reads what `ip -j addr` / `ip -j -4 route` /
//! `ip -j -6 route` printed on some machine, so the translation can be tested on recorded
//! provider shapes.

use super::netlink::{self, consts::*, IfAddr, IfInfo, RtMsg, Socket};
use super::Prefix;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

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

    pub fn parse(text: &str) -> Option<Scope> {
        // iproute2 says "universe" in some versions and "global" in others.
        if text == "universe" {
            return Some(Scope::UNIVERSE);
        }
        Self::NAMES
            .iter()
            .find(|(_, n)| *n == text)
            .map(|(s, _)| *s)
            .or_else(|| text.parse().ok().map(Scope))
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

    pub fn parse(text: &str) -> Option<Protocol> {
        Self::NAMES
            .iter()
            .find(|(_, name)| *name == text)
            .map(|(n, _)| Protocol(*n))
            .or_else(|| text.parse().ok().map(Protocol))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    pub altnames: Vec<String>,
    /// Lower-case, colon-separated; `None` for links without a hardware address (tunnels).
    pub mac: Option<String>,
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

pub fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
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
            IFLA_ADDRESS if !value.is_empty() => link.mac = Some(format_mac(value)),
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

/// Reads `ip -j addr`, `ip -j -4 route` and `ip -j -6 route` output.
///
/// iproute2's JSON has no sysfs view: a link counts as physical when it is an Ethernet link
/// without `linkinfo` (which `ip -d` adds for software links), and drivers stay unknown.
pub fn from_iproute2_json(addr_json: &str, route4_json: &str, route6_json: &str) -> Result<NetworkFacts> {
    let links_json: Vec<Value> = serde_json::from_str(addr_json).context("reading `ip -j addr` JSON")?;
    let mut facts = NetworkFacts::default();
    let mut masters = Vec::new();
    for entry in &links_json {
        let Some(ifindex) = entry["ifindex"].as_u64().and_then(|i| u32::try_from(i).ok()) else {
            bail!("`ip -j addr` entry without ifindex: {entry}");
        };
        let name = text(&entry["ifname"]).with_context(|| format!("link {ifindex} has no ifname"))?;
        let flags: Vec<&str> = entry["flags"]
            .as_array()
            .map(|f| f.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let link_type = entry["link_type"].as_str().unwrap_or("");
        let kind = text(&entry["linkinfo"]["info_kind"]);
        let loopback = flags.contains(&"LOOPBACK") || link_type == "loopback";
        if let Some(master) = text(&entry["master"]) {
            masters.push((ifindex, master));
        }
        facts.links.push(Link {
            ifindex,
            altnames: entry["altnames"]
                .as_array()
                .map(|a| a.iter().filter_map(text).collect())
                .unwrap_or_default(),
            mac: text(&entry["address"]).map(|m| m.to_ascii_lowercase()),
            loopback,
            up: flags.contains(&"UP"),
            mtu: entry["mtu"].as_u64().and_then(|m| u32::try_from(m).ok()),
            physical: !loopback && link_type == "ether" && kind.is_none(),
            kind,
            driver: None,
            module: None,
            master: None,
            virtual_function: false,
            name,
        });
        for info in entry["addr_info"].as_array().into_iter().flatten() {
            facts.addresses.push(
                json_address(ifindex, info)
                    .with_context(|| format!("address entry {info} of link {ifindex}"))?,
            );
        }
    }
    let by_name: BTreeMap<String, u32> = facts.links.iter().map(|l| (l.name.clone(), l.ifindex)).collect();
    for (ifindex, master) in masters {
        let master_index = by_name.get(&master).copied();
        if let Some(link) = facts.links.iter_mut().find(|l| l.ifindex == ifindex) {
            link.master = master_index;
        }
    }
    for (json, family, what) in [
        (route4_json, Family::Inet, "`ip -j -4 route`"),
        (route6_json, Family::Inet6, "`ip -j -6 route`"),
    ] {
        let entries: Vec<Value> =
            serde_json::from_str(json).with_context(|| format!("reading {what} JSON"))?;
        for entry in &entries {
            facts.routes.extend(
                json_route(entry, family, &by_name).with_context(|| format!("{what} entry {entry}"))?,
            );
        }
    }
    Ok(facts)
}

fn text(value: &Value) -> Option<String> {
    value.as_str().map(str::to_string)
}

fn json_address(ifindex: u32, info: &Value) -> Result<Address> {
    let family = match info["family"].as_str() {
        Some("inet") => Family::Inet,
        Some("inet6") => Family::Inet6,
        other => bail!("unknown address family {other:?}"),
    };
    let address: IpAddr = info["local"]
        .as_str()
        .context("no \"local\" address")?
        .parse()
        .context("\"local\" is not an IP address")?;
    let prefix = info["prefixlen"]
        .as_u64()
        .and_then(|p| u8::try_from(p).ok())
        .context("no \"prefixlen\"")?;
    let scope = info["scope"]
        .as_str()
        .and_then(Scope::parse)
        .unwrap_or(Scope::UNIVERSE);
    let valid = info["valid_life_time"]
        .as_u64()
        .unwrap_or(INFINITY_LIFE_TIME as u64);
    let dynamic_flag = info["dynamic"].as_bool().unwrap_or(false);
    let mut flags = if dynamic_flag { 0 } else { IFA_F_PERMANENT };
    if info["tentative"].as_bool().unwrap_or(false) {
        flags |= IFA_F_TENTATIVE;
    }
    if info["nodad"].as_bool().unwrap_or(false) {
        flags |= IFA_F_NODAD;
    }
    Ok(Address {
        ifindex,
        family,
        address,
        prefix,
        scope,
        dynamic: dynamic_flag || valid != INFINITY_LIFE_TIME as u64,
        flags,
    })
}

fn json_route(entry: &Value, family: Family, by_name: &BTreeMap<String, u32>) -> Result<Vec<Route>> {
    // Only unicast routes of the main table, as the netlink side keeps.
    if entry["type"].as_str().is_some_and(|t| t != "unicast")
        || entry["table"].as_str().is_some_and(|t| t != "main")
    {
        return Ok(Vec::new());
    }
    let dst = entry["dst"].as_str().context("no \"dst\"")?;
    let destination = if dst == "default" {
        None
    } else {
        let prefix = Prefix::parse_host_or_cidr(dst)
            .with_context(|| format!("\"dst\" {dst:?} is not an address or prefix"))?;
        (prefix.len > 0 || !prefix.addr.is_unspecified()).then_some(prefix)
    };
    let protocol = match &entry["protocol"] {
        Value::String(name) => Protocol::parse(name).unwrap_or_else(|| {
            log::warn!("unknown route protocol {name:?}; treating it as unspecified");
            Protocol::UNSPEC
        }),
        Value::Number(n) => Protocol(n.as_u64().and_then(|n| u8::try_from(n).ok()).unwrap_or(0)),
        _ => Protocol::BOOT,
    };
    let scope = entry["scope"]
        .as_str()
        .and_then(Scope::parse)
        .unwrap_or(Scope::UNIVERSE);
    let has_flag = |value: &Value, flag: &str| {
        value["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x.as_str() == Some(flag)))
    };
    let hop_gateway = |value: &Value| -> Result<Option<IpAddr>> {
        let text = value["gateway"]
            .as_str()
            .or_else(|| value["via"]["host"].as_str());
        text.map(|t| t.parse().with_context(|| format!("gateway {t:?}")))
            .transpose()
    };
    let device = |value: &Value| value["dev"].as_str().and_then(|d| by_name.get(d).copied());
    let route = Route {
        family,
        destination,
        gateway: hop_gateway(entry)?,
        oif: device(entry),
        protocol,
        scope,
        onlink: has_flag(entry, "onlink"),
        metric: entry["metric"].as_u64().and_then(|m| u32::try_from(m).ok()),
    };
    let Some(hops) = entry["nexthops"].as_array() else {
        return Ok(vec![route]);
    };
    hops.iter()
        .map(|hop| {
            Ok(Route {
                gateway: hop_gateway(hop)?,
                oif: device(hop),
                onlink: route.onlink || has_flag(hop, "onlink"),
                ..route.clone()
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::netlink::Builder;
    use crate::network::test_fixtures::fixture;

    #[test]
    fn reads_the_hetzner_fixture() {
        let facts = fixture("hetzner-cloud");
        let eth0 = facts.link_named("eth0").unwrap();
        assert_eq!(eth0.mac.as_deref(), Some("96:00:02:1a:2b:3c"));
        assert_eq!(eth0.altnames, ["enp1s0"]);
        assert!(eth0.physical && !eth0.loopback && eth0.up);
        let lo = facts.link_named("lo").unwrap();
        assert!(lo.loopback && !lo.physical);

        let v4: Vec<_> = facts
            .addresses_of(eth0.ifindex)
            .filter(|a| a.family == Family::Inet)
            .collect();
        assert_eq!(v4.len(), 1);
        assert_eq!(v4[0].address.to_string(), "203.0.113.10");
        assert_eq!(v4[0].prefix, 32);
        assert!(v4[0].dynamic);
        let v6_global = facts
            .addresses_of(eth0.ifindex)
            .find(|a| a.address.to_string() == "2001:db8:c0de:1::1")
            .unwrap();
        assert!(!v6_global.dynamic);
        assert_eq!(v6_global.scope, Scope::UNIVERSE);

        let default4 = facts
            .routes
            .iter()
            .find(|r| r.family == Family::Inet && r.destination.is_none())
            .unwrap();
        assert_eq!(default4.gateway.unwrap().to_string(), "172.31.1.1");
        assert_eq!(default4.protocol, Protocol::DHCP);
        assert_eq!(default4.oif, Some(eth0.ifindex));
        assert_eq!(default4.metric, Some(100));
        let host = facts
            .routes
            .iter()
            .find(|r| r.destination.is_some_and(|d| d.len == 32))
            .unwrap();
        assert_eq!(host.destination.unwrap().to_string(), "172.31.1.1/32");
        assert_eq!(host.scope, Scope::LINK);
        assert!(host.gateway.is_none());
        let kernel6 = facts
            .routes
            .iter()
            .filter(|r| r.family == Family::Inet6 && r.protocol == Protocol::KERNEL)
            .count();
        assert_eq!(kernel6, 2);
    }

    #[test]
    fn resolves_masters_by_name() {
        let facts = fixture("azure-accelerated");
        let eth0 = facts.link_named("eth0").unwrap();
        let vf = facts.link_named("enP30832s1").unwrap();
        assert_eq!(vf.master, Some(eth0.ifindex));
        assert_eq!(eth0.master, None);
        assert_eq!(vf.mac, eth0.mac);
        // Azure's DHCP client marks the lease dynamic although its lifetime is infinite.
        let a = facts.addresses_of(eth0.ifindex).next().unwrap();
        assert!(a.dynamic);
    }

    #[test]
    fn reads_via_nexthops_onlink_and_skips_other_tables() {
        let addr = r#"[{"ifindex":2,"ifname":"eth0","flags":["UP"],"link_type":"ether",
            "address":"52:54:00:AA:BB:CC","addr_info":[]},
            {"ifindex":3,"ifname":"br0","flags":["UP"],"link_type":"ether",
            "address":"52:54:00:aa:bb:cd","linkinfo":{"info_kind":"bridge"},"addr_info":[]}]"#;
        let route4 = r#"[
            {"dst":"default","via":{"family":"inet6","host":"fe80::1"},"dev":"eth0","protocol":"static","flags":["onlink"]},
            {"dst":"10.0.0.0/8","nexthops":[{"gateway":"192.0.2.1","dev":"eth0","flags":[]},{"gateway":"192.0.2.2","dev":"br0","flags":["onlink"]}],"protocol":"zebra","flags":[]},
            {"type":"unreachable","dst":"192.168.0.0/16","protocol":"boot","flags":[]},
            {"dst":"1.2.3.4","dev":"eth0","table":"local","flags":[]}
        ]"#;
        let facts = from_iproute2_json(addr, route4, "[]").unwrap();
        let eth0 = facts.link_named("eth0").unwrap();
        assert_eq!(eth0.mac.as_deref(), Some("52:54:00:aa:bb:cc"));
        assert!(eth0.physical);
        assert!(!facts.link_named("br0").unwrap().physical);
        assert_eq!(facts.routes.len(), 3);
        let default = &facts.routes[0];
        assert_eq!(default.family, Family::Inet);
        assert_eq!(default.gateway.unwrap().to_string(), "fe80::1");
        assert!(default.onlink);
        assert_eq!(facts.routes[1].oif, Some(2));
        assert!(!facts.routes[1].onlink);
        assert_eq!(facts.routes[2].oif, Some(3));
        assert!(facts.routes[2].onlink);
        assert_eq!(facts.routes[2].protocol.name(), "zebra");
    }

    #[test]
    fn bad_json_is_an_error() {
        assert!(from_iproute2_json("{", "[]", "[]").is_err());
        let no_index = r#"[{"ifname":"eth0"}]"#;
        assert!(from_iproute2_json(no_index, "[]", "[]").is_err());
        let bad_addr =
            r#"[{"ifindex":1,"ifname":"eth0","addr_info":[{"family":"inet","local":"x","prefixlen":8}]}]"#;
        assert!(from_iproute2_json(bad_addr, "[]", "[]").is_err());
    }

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
        assert_eq!(link.mac.as_deref(), Some("96:00:02:1a:2b:3c"));
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
