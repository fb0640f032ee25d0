//! Test-only: facts from what `ip -j addr`, `ip -j -4 route` and `ip -j -6 route` printed on
//! some machine, so the translation can be tested on recorded provider shapes
//! (tests/fixtures/network). The agent itself asks the kernel ([`super::gather`]).

use super::*;
use crate::network::Prefix;
use anyhow::bail;
use serde_json::Value;
use std::collections::BTreeMap;

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
            // Tunnels print their IPv4 address here, which is no MAC.
            mac: entry["address"].as_str().and_then(|m| m.parse().ok()),
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
        let prefix =
            host_or_cidr(dst).with_context(|| format!("\"dst\" {dst:?} is not an address or prefix"))?;
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

/// iproute2 prints host routes without a length.
fn host_or_cidr(text: &str) -> Option<Prefix> {
    if text.contains('/') {
        return text.parse().ok();
    }
    let addr: IpAddr = text.parse().ok()?;
    Some(Prefix::new(addr, if addr.is_ipv4() { 32 } else { 128 }))
}

impl Scope {
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

impl Protocol {
    pub fn parse(text: &str) -> Option<Protocol> {
        Self::NAMES
            .iter()
            .find(|(_, name)| *name == text)
            .map(|(n, _)| Protocol(*n))
            .or_else(|| text.parse().ok().map(Protocol))
    }
}

mod tests {
    use super::*;
    use crate::network::test_fixtures::fixture;

    #[test]
    fn reads_the_hetzner_fixture() {
        let facts = fixture("hetzner-cloud");
        let eth0 = facts.link_named("eth0").unwrap();
        assert_eq!(
            eth0.mac.map(|m| m.to_string()).as_deref(),
            Some("96:00:02:1a:2b:3c")
        );
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
        assert_eq!(
            eth0.mac.map(|m| m.to_string()).as_deref(),
            Some("52:54:00:aa:bb:cc")
        );
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
}
