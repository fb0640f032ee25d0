//! The installed system's network: `network.nix` for NixOS, systemd-networkd matched by MAC.
//!
//! Routes use the flat form `routes = [ { Gateway = ...; GatewayOnLink = true; } ]`. In
//! nixpkgs' nixos/modules/system/boot/networkd.nix the `routes` option is
//! `types.listOf (mkSubsectionType "routeConfig" check.network.sectionRoute)`, which takes
//! the [Route] keys directly and only warns about the old `routeConfig` wrapper; releases
//! before that change (their networkd.nix has `routeOptions.options.routeConfig`) need the
//! wrapper instead. `sectionRoute` lists `GatewayOnLink` (boolValues), `sectionNetwork`
//! allows `DHCP = "ipv4"` and `IPv6AcceptRA` (boolValues), and `sectionLink` in .network
//! files allows `RequiredForOnline` with "routable" and "no".

use super::facts::NetworkFacts;
use super::{choose_link, mac_is_shared, Destination};
use crate::input::runtime_info::{self, Interface, Network};
use crate::installer::templates::{self, Value};
use anyhow::Result;
use std::collections::BTreeSet;

pub const NETWORK: &str = include_str!("../../../nix/templates/host/network.nix");

/// Renders `network.nix`. `facts` is the installer's own view after [`super::apply`]: where
/// a MAC is shared (Azure's VF) or the NIC is hv_netvsc, the match also names the driver so
/// the installed system leaves the VF alone; without facts the match is by MAC only.
pub fn render(network: &Network, facts: Option<&NetworkFacts>) -> Result<String> {
    let carries_default: Vec<bool> = network.interfaces.iter().map(has_way_out).collect();
    let mut names = BTreeSet::new();
    let mut blocks = Vec::new();
    for (interface, way_out) in network.interfaces.iter().zip(carries_default) {
        let name = unit_name(interface, &mut names);
        blocks.push(network_block(interface, &name, way_out, network, facts)?);
    }
    templates::render(
        NETWORK,
        &[
            (
                "nameservers",
                Value::Block(templates::list_lines(&network.nameservers, 4)),
            ),
            ("networks", Value::Block(blocks.join("\n    "))),
        ],
    )
}

/// Kernel modules of the configured NICs' drivers (built-in drivers have none), e.g. for
/// `boot.initrd.availableKernelModules` when the initrd needs the network.
pub fn nic_modules(network: &Network, facts: &NetworkFacts) -> Vec<String> {
    let modules: BTreeSet<String> = network
        .interfaces
        .iter()
        .filter_map(|i| choose_link(facts, i.mac))
        .filter_map(|l| l.module.clone())
        .collect();
    modules.into_iter().collect()
}

fn has_way_out(interface: &Interface) -> bool {
    interface.dhcp || interface.routes.iter().any(|r| r.to.is_default())
}

/// `10-<name>`, from the name the rescue system used (only a label: matching is by MAC).
fn unit_name(interface: &Interface, used: &mut BTreeSet<String>) -> String {
    let base: String = interface
        .name
        .clone()
        .unwrap_or_else(|| interface.mac.to_string().replace(':', ""))
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut name = format!("10-{base}");
    let mut n = 2;
    while used.contains(&name) {
        name = format!("10-{base}-{n}");
        n += 1;
    }
    used.insert(name.clone());
    name
}

fn route_nix(route: &runtime_info::Route) -> String {
    let mut fields = Vec::new();
    let destination = match route.to {
        // networkd takes a route's family from its gateway, as runtime info does.
        Destination::Default if route.via.is_some() => None,
        Destination::Default => Some("0.0.0.0/0".to_string()),
        Destination::Prefix(prefix) => Some(prefix.to_string()),
    };
    if let Some(destination) = destination {
        fields.push(format!("Destination = {};", templates::string(&destination)));
    }
    if let Some(via) = route.via {
        fields.push(format!("Gateway = {};", templates::string(&via.to_string())));
        if route.onlink {
            fields.push("GatewayOnLink = true;".into());
        }
    }
    format!("{{ {} }}", fields.join(" "))
}

fn network_block(
    interface: &Interface,
    name: &str,
    way_out: bool,
    network: &Network,
    facts: Option<&NetworkFacts>,
) -> Result<String> {
    let mut lines = vec![format!("{} = {{", templates::string(name))];
    let mut push = |line: String| lines.push(format!("  {line}"));
    push(format!(
        "matchConfig.MACAddress = {};",
        templates::string(&interface.mac.to_string())
    ));
    let link = facts.and_then(|f| choose_link(f, interface.mac).map(|l| (f, l)));
    if let Some((facts, link)) = link {
        if let Some(driver) = &link.driver {
            if driver == "hv_netvsc" || mac_is_shared(facts, interface.mac) {
                push("# The SR-IOV VF has this MAC too; naming the driver leaves it alone.".into());
                push(format!("matchConfig.Driver = {};", templates::string(driver)));
            }
        }
    }
    if !interface.addresses.is_empty() {
        push("address = [".into());
        push(format!("  {}", templates::list_lines(&interface.addresses, 8)));
        push("];".into());
    }
    if !interface.routes.is_empty() {
        push("routes = [".into());
        for route in &interface.routes {
            push(format!("  {}", route_nix(route)));
        }
        push("];".into());
    }
    if way_out && !network.nameservers.is_empty() {
        // Only where the default route is: systemd-resolved sends a link's DNS queries out of
        // that link, and a private NIC (DigitalOcean's VPC) cannot reach public resolvers.
        push("dns = [".into());
        push(format!("  {}", templates::list_lines(&network.nameservers, 8)));
        push("];".into());
    }
    push(format!(
        "networkConfig.DHCP = {};",
        templates::string(if interface.dhcp { "ipv4" } else { "no" })
    ));
    // A static IPv6 default (Hetzner's fe80::1) needs no router advertisements; anywhere
    // else they are how IPv6, if any, arrives.
    let static_v6_default = interface.routes.iter().any(|r| {
        r.to.is_default()
            && match r.to {
                Destination::Prefix(prefix) => prefix.addr.is_ipv6(),
                Destination::Default => r.via.is_some_and(|v| v.is_ipv6()),
            }
    });
    push(format!("networkConfig.IPv6AcceptRA = {};", !static_v6_default));
    // Waiting for a secondary NIC without a default route would only delay boot.
    push(format!(
        "linkConfig.RequiredForOnline = {};",
        templates::string(if way_out { "routable" } else { "no" })
    ));
    lines.push("};".into());
    Ok(lines.join("\n    "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::test_fixtures::{fixture, read, route, PROVIDERS};
    use crate::network::translate::{nameservers_from, translate};
    use serde_json::{json, Value as Json};
    use std::process::Command;

    fn nix_instantiate(args: &[&str], text: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("network.nix");
        std::fs::write(&file, text).unwrap();
        let output = Command::new("nix-instantiate")
            .args(args)
            .arg(&file)
            .output()
            .expect("nix-instantiate (Debian nix-bin) must be installed for this test");
        assert!(
            output.status.success(),
            "nix-instantiate {args:?} rejected:\n{text}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Parses, then evaluates the module's attribute set to JSON (it needs no nixpkgs).
    fn evaluate(text: &str) -> Json {
        nix_instantiate(&["--parse"], text);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("network.nix");
        std::fs::write(&file, text).unwrap();
        let output = Command::new("nix-instantiate")
            .args(["--eval", "--strict", "--json", "--expr"])
            .arg(format!("import {} {{ }}", file.display()))
            .output()
            .expect("nix-instantiate (Debian nix-bin) must be installed for this test");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    fn rendered(name: &str) -> (String, Json) {
        let facts = fixture(name);
        let nameservers = nameservers_from(
            &read(name, "resolv.conf").unwrap(),
            read(name, "upstream-resolv.conf").as_deref(),
        );
        let network = translate(&facts, nameservers);
        let text = render(&network, Some(&facts)).unwrap();
        let value = evaluate(&text);
        (text, value)
    }

    #[test]
    fn template_alone_is_valid_nix() {
        let value = evaluate(NETWORK);
        assert_eq!(value["networking"]["useNetworkd"], true);
        assert_eq!(value["networking"]["useDHCP"], false);
    }

    #[test]
    fn hetzner_cloud() {
        let (_, v) = rendered("hetzner-cloud");
        assert_eq!(v["networking"]["useNetworkd"], true);
        assert_eq!(v["networking"]["useDHCP"], false);
        assert_eq!(
            v["networking"]["nameservers"],
            json!(["185.12.64.1", "185.12.64.2"])
        );
        let networks = v["systemd"]["network"]["networks"].as_object().unwrap();
        assert_eq!(networks.len(), 1);
        assert_eq!(
            networks["10-eth0"],
            json!({
                "matchConfig": {"MACAddress": "96:00:02:1a:2b:3c"},
                "address": ["2001:db8:c0de:1::1/64"],
                "routes": [{"Gateway": "fe80::1"}],
                "dns": ["185.12.64.1", "185.12.64.2"],
                "networkConfig": {"DHCP": "ipv4", "IPv6AcceptRA": false},
                "linkConfig": {"RequiredForOnline": "routable"},
            })
        );
    }

    #[test]
    fn hetzner_static_onlink_gateway() {
        let facts = fixture("hetzner-cloud-static");
        let network = translate(&facts, vec!["185.12.64.1".parse().unwrap()]);
        let v = evaluate(&render(&network, Some(&facts)).unwrap());
        let eth0 = &v["systemd"]["network"]["networks"]["10-eth0"];
        assert_eq!(
            eth0["address"],
            json!(["203.0.113.10/32", "2001:db8:c0de:1::1/64"])
        );
        assert_eq!(
            eth0["routes"],
            json!([
                {"Gateway": "172.31.1.1", "GatewayOnLink": true},
                {"Gateway": "fe80::1"},
            ])
        );
        assert_eq!(eth0["networkConfig"]["DHCP"], "no");
    }

    #[test]
    fn oracle_cloud() {
        let (_, v) = rendered("oracle-cloud");
        assert_eq!(v["networking"]["nameservers"], json!(["169.254.169.254"]));
        let ens3 = &v["systemd"]["network"]["networks"]["10-ens3"];
        assert_eq!(
            *ens3,
            json!({
                "matchConfig": {"MACAddress": "02:00:17:05:aa:01"},
                "dns": ["169.254.169.254"],
                "networkConfig": {"DHCP": "ipv4", "IPv6AcceptRA": true},
                "linkConfig": {"RequiredForOnline": "routable"},
            })
        );
    }

    #[test]
    fn digitalocean_public_and_private_nic() {
        let (_, v) = rendered("digitalocean");
        let networks = &v["systemd"]["network"]["networks"];
        assert_eq!(
            networks["10-eth0"],
            json!({
                "matchConfig": {"MACAddress": "ae:3c:9d:11:22:01"},
                "address": ["203.0.113.50/20", "10.19.0.5/16", "2001:db8:d0:1::4a:1/64"],
                "routes": [{"Gateway": "203.0.113.1"}, {"Gateway": "2001:db8:d0:1::1"}],
                "dns": ["67.207.67.2", "67.207.67.3"],
                "networkConfig": {"DHCP": "no", "IPv6AcceptRA": false},
                "linkConfig": {"RequiredForOnline": "routable"},
            })
        );
        assert_eq!(
            networks["10-eth1"],
            json!({
                "matchConfig": {"MACAddress": "5a:1f:0e:11:22:02"},
                "address": ["10.114.0.2/20"],
                "networkConfig": {"DHCP": "no", "IPv6AcceptRA": true},
                "linkConfig": {"RequiredForOnline": "no"},
            })
        );
    }

    #[test]
    fn azure_matches_the_synthetic_nic_by_mac_and_driver() {
        let (text, v) = rendered("azure-accelerated");
        let networks = v["systemd"]["network"]["networks"].as_object().unwrap();
        assert_eq!(networks.len(), 1);
        assert_eq!(
            networks["10-eth0"],
            json!({
                "matchConfig": {"MACAddress": "00:22:48:6a:1b:2c", "Driver": "hv_netvsc"},
                "dns": ["168.63.129.16"],
                "networkConfig": {"DHCP": "ipv4", "IPv6AcceptRA": true},
                "linkConfig": {"RequiredForOnline": "routable"},
            })
        );
        assert!(!text.contains("enP30832s1"));
        assert_eq!(
            nic_modules(
                &translate(&fixture("azure-accelerated"), vec![]),
                &fixture("azure-accelerated")
            ),
            ["hv_netvsc"]
        );
    }

    #[test]
    fn without_facts_the_match_is_by_mac_only() {
        let facts = fixture("azure-accelerated");
        let network = translate(&facts, vec![]);
        let v = evaluate(&render(&network, None).unwrap());
        assert_eq!(
            v["systemd"]["network"]["networks"]["10-eth0"]["matchConfig"],
            json!({"MACAddress": "00:22:48:6a:1b:2c"})
        );
        assert_eq!(v["networking"]["nameservers"], json!([]));
    }

    #[test]
    fn every_fixture_renders_valid_nix() {
        for name in PROVIDERS {
            let (text, _) = rendered(name);
            nix_instantiate(&["--parse"], &text);
            assert!(!text.contains("/*@"), "{name}");
        }
    }

    #[test]
    fn odd_routes_names_and_hostile_strings_stay_inside_strings() {
        let network = Network {
            interfaces: vec![
                Interface {
                    mac: "52:54:00:12:34:56".parse().unwrap(),
                    name: Some("we\"ird ${x}".into()),
                    addresses: vec!["192.0.2.10/24".parse().unwrap()],
                    routes: vec![
                        route("0.0.0.0/0", Some("fe80::1"), false),
                        route("10.0.0.0/8", None, false),
                    ],
                    dhcp: false,
                },
                Interface {
                    mac: "52:54:00:12:34:57".parse().unwrap(),
                    name: None,
                    dhcp: true,
                    ..Interface::default()
                },
                Interface {
                    mac: "52:54:00:12:34:58".parse().unwrap(),
                    name: Some("we\"ird ${x}".into()),
                    dhcp: true,
                    ..Interface::default()
                },
            ],
            nameservers: vec!["192.0.2.53".parse().unwrap()],
        };
        let v = evaluate(&render(&network, None).unwrap());
        let networks = &v["systemd"]["network"]["networks"];
        let first = &networks["10-we-ird---x-"];
        assert_eq!(
            first["routes"],
            json!([
                {"Destination": "0.0.0.0/0", "Gateway": "fe80::1"},
                {"Destination": "10.0.0.0/8"},
            ])
        );
        // An IPv4 default through an IPv6 next hop is not an IPv6 default.
        assert_eq!(first["networkConfig"]["IPv6AcceptRA"], true);
        assert_eq!(networks["10-525400123457"]["networkConfig"]["DHCP"], "ipv4");
        assert!(networks["10-we-ird---x--2"].is_object(), "{networks}");

        // A MAC that is none cannot get this far: reading the runtime info refuses it.
        let bad = serde_json::from_value::<Network>(json!({"interfaces": [{"mac": "not a mac"}]}));
        assert!(bad.is_err());
    }
}
