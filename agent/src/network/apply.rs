//! Installer side: bring runtime info's network up before anything needs it.
//!
//! Links are found by MAC (the installer kernel may name them differently from the rescue
//! system), then, over rtnetlink: link up, static addresses (IPv6 without DAD so they work at
//! once), DHCP through busybox `udhcpc` where the rescue system had a lease, static routes
//! (onlink where the gateway lies outside every prefix), and /etc/resolv.conf.

use super::facts::{self, Family, Link, NetworkFacts};
use super::netlink::{consts::*, Builder, IfAddr, IfInfo, KernelError, RtMsg, Socket};
use super::{choose_link, Destination, Prefix};
use crate::error::user_error;
use crate::input::runtime_info::{self, Interface, Network};
use anyhow::{bail, Context, Result};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub struct Options {
    pub resolv_conf: PathBuf,
    /// Holds the udhcpc script and what it learns (DNS servers per interface).
    pub run_dir: PathBuf,
    /// How long to wait for NICs whose driver is still probing.
    pub link_timeout: Duration,
    /// The DHCP client, program first (busybox's udhcpc; `["busybox", "udhcpc"]` also works).
    pub udhcpc: Vec<String>,
    pub sys_class_net: PathBuf,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            run_dir: PathBuf::from("/run/nixos-kexec"),
            link_timeout: Duration::from_secs(20),
            udhcpc: vec!["udhcpc".into()],
            sys_class_net: PathBuf::from("/sys/class/net"),
        }
    }
}

/// Applies the network with the installer's defaults; returns the kernel's view afterwards
/// (hand it to [`super::nixos::render`] so the installed system matches the same NICs).
pub fn apply(network: &Network) -> Result<NetworkFacts> {
    apply_with(network, &Options::default())
}

pub fn apply_with(network: &Network, options: &Options) -> Result<NetworkFacts> {
    let mut socket = Socket::open()?;
    let initial = facts::gather_from(&mut socket, &options.sys_class_net)?;
    // As PID 1 nothing else brings lo up, and local services (the Nix daemon) need it.
    if let Some(lo) = initial.links.iter().find(|l| l.loopback) {
        set_up(&mut socket, lo).context("bringing lo up")?;
    }
    let facts = wait_for_macs(&mut socket, network, options)?;

    let mut failures: Vec<String> = Vec::new();
    let mut configured: Vec<(&Interface, Link)> = Vec::new();
    for interface in &network.interfaces {
        let Some(link) = choose_link(&facts, interface.mac).cloned() else {
            continue;
        };
        log::info!(
            "network: configuring {} ({}{}) for {}",
            link.name,
            interface.mac,
            link.driver
                .as_deref()
                .map(|d| format!(", {d}"))
                .unwrap_or_default(),
            interface.name.as_deref().unwrap_or("an unnamed interface"),
        );
        set_up(&mut socket, &link).with_context(|| format!("bringing {} up", link.name))?;
        configured.push((interface, link));
    }

    // DHCP first: udhcpc's deconfig flushes IPv4 addresses, which must not hit static ones.
    // All clients run at once, so NICs without a DHCP server cost their timeout only once.
    let dhcp_links: Vec<&Link> = configured
        .iter()
        .filter(|(interface, _)| interface.dhcp)
        .map(|(_, link)| link)
        .collect();
    if !dhcp_links.is_empty() {
        let script = write_dhcp_script(&options.run_dir)?;
        let results: Vec<(String, Result<()>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = dhcp_links
                .iter()
                .map(|link| {
                    let script = &script;
                    let name = link.name.clone();
                    scope.spawn(move || {
                        let result = run_dhcp(options, &name, script);
                        (name, result)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| ("?".into(), Err(anyhow::anyhow!("the DHCP thread panicked"))))
                })
                .collect()
        });
        for (name, result) in results {
            // Logged below: as a warning when the network works anyway, else in the error.
            if let Err(e) = result {
                failures.push(format!("DHCP on {name}: {e:#}"));
            }
        }
    }
    for (interface, link) in &configured {
        for &prefix in &interface.addresses {
            if let Err(e) = add_address(&mut socket, link.ifindex, prefix) {
                failures.push(format!("address {prefix} on {}: {e}", link.name));
            }
        }
    }
    for (interface, link) in &configured {
        for route in &interface.routes {
            match socket.execute(route_request(route, link.ifindex)) {
                Ok(()) => {}
                Err(e) if e.errno == libc::EEXIST => {
                    log::info!(
                        "network: route {} on {} is already present",
                        describe_route(route),
                        link.name
                    );
                }
                Err(e) => failures.push(format!("route {} on {}: {e}", describe_route(route), link.name)),
            }
        }
    }

    let mut nameservers = network.nameservers.clone();
    for (interface, link) in &configured {
        if interface.dhcp {
            for server in dhcp_nameservers(&options.run_dir, &link.name) {
                if !nameservers.contains(&server) {
                    nameservers.push(server);
                }
            }
        }
    }
    write_resolv_conf(&options.resolv_conf, &nameservers)?;

    let after = facts::gather_from(&mut socket, &options.sys_class_net)?;
    for (_, link) in &configured {
        for line in describe_link(&after, link.ifindex) {
            log::info!("{line}");
        }
    }
    if !failures.is_empty() {
        let has_default = after.routes.iter().any(|r| r.destination.is_none());
        if has_default {
            for failure in &failures {
                log::warn!("network: {failure}");
            }
        } else {
            bail!(
                "the network did not come up (no default route): {}",
                failures.join("; ")
            );
        }
    }
    Ok(after)
}

fn wait_for_macs(socket: &mut Socket, network: &Network, options: &Options) -> Result<NetworkFacts> {
    let deadline = Instant::now() + options.link_timeout;
    loop {
        let facts = facts::gather_from(socket, &options.sys_class_net)?;
        let missing: Vec<&Interface> = network
            .interfaces
            .iter()
            .filter(|i| choose_link(&facts, i.mac).is_none())
            .collect();
        if missing.is_empty() {
            return Ok(facts);
        }
        if Instant::now() >= deadline {
            let present: Vec<String> = facts
                .links
                .iter()
                .filter(|l| !l.loopback)
                .map(|l| {
                    format!(
                        "{} {}{}",
                        l.name,
                        l.mac.map_or("(no MAC)".to_string(), |m| m.to_string()),
                        l.driver.as_deref().map(|d| format!(" ({d})")).unwrap_or_default()
                    )
                })
                .collect();
            let wanted: Vec<String> = missing
                .iter()
                .map(|i| match &i.name {
                    Some(name) => format!("{} (was {name})", i.mac),
                    None => i.mac.to_string(),
                })
                .collect();
            return Err(user_error(
                format!(
                    "No network interface has MAC address {} after {} s. Present: {}.",
                    wanted.join(", "),
                    options.link_timeout.as_secs(),
                    if present.is_empty() {
                        "none".to_string()
                    } else {
                        present.join(", ")
                    }
                ),
                "check network.interfaces[].mac in the runtime info against the machine's \
                 NICs, and that the installer bundle has the NIC's driver module; drop the \
                 interface from the runtime info if the NIC is gone.",
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub(crate) fn set_up(socket: &mut Socket, link: &Link) -> Result<(), KernelError> {
    socket.execute(link_up_request(link.ifindex))
}

pub(crate) fn link_up_request(ifindex: u32) -> Builder {
    Builder::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK).fixed(
        &IfInfo {
            family: 0,
            link_type: 0,
            index: ifindex as i32,
            flags: IFF_UP,
            change: IFF_UP,
        }
        .to_bytes(),
    )
}

pub(crate) fn address_request(ifindex: u32, prefix: Prefix) -> Builder {
    // DAD would keep an IPv6 address tentative (unusable) for a second or more, and the
    // address was in use on this very NIC a minute ago.
    let flags = if prefix.addr.is_ipv6() { IFA_F_NODAD } else { 0 };
    Builder::new(
        RTM_NEWADDR,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
    )
    .fixed(
        &IfAddr {
            family: super::netlink::family_of(prefix.addr),
            prefix_len: prefix.len,
            flags: flags as u8,
            scope: 0,
            index: ifindex,
        }
        .to_bytes(),
    )
    .attr_ip(IFA_LOCAL, prefix.addr)
    .attr_ip(IFA_ADDRESS, prefix.addr)
    .attr_u32(IFA_FLAGS, flags)
}

fn add_address(socket: &mut Socket, ifindex: u32, prefix: Prefix) -> Result<(), KernelError> {
    socket.execute(address_request(ifindex, prefix))
}

/// Family and destination (`None` for a default route) of a runtime-info route; see the
/// module docs of [`super`] for how `default` takes its family.
fn route_target(route: &runtime_info::Route) -> (Family, Option<Prefix>) {
    match route.to {
        Destination::Default => (route.via.map(Family::of).unwrap_or(Family::Inet), None),
        Destination::Prefix(prefix) => (Family::of(prefix.addr), (prefix.len > 0).then_some(prefix)),
    }
}

pub(crate) fn route_request(route: &runtime_info::Route, ifindex: u32) -> Builder {
    let (family, destination) = route_target(route);
    let via = route.via;
    let af = match family {
        Family::Inet => AF_INET,
        Family::Inet6 => AF_INET6,
    };
    let header = RtMsg {
        family: af,
        dst_len: destination.map(|d| d.len).unwrap_or(0),
        table: RT_TABLE_MAIN,
        protocol: super::facts::Protocol::STATIC.0,
        scope: if via.is_some() {
            super::facts::Scope::UNIVERSE.0
        } else {
            super::facts::Scope::LINK.0
        },
        kind: RTN_UNICAST,
        flags: if route.onlink { RTNH_F_ONLINK } else { 0 },
        ..RtMsg::default()
    };
    let mut request = Builder::new(
        RTM_NEWROUTE,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )
    .fixed(&header.to_bytes())
    .attr_u32(RTA_TABLE, RT_TABLE_MAIN as u32);
    if let Some(destination) = destination {
        request = request.attr_ip(RTA_DST, destination.addr);
    }
    if let Some(gateway) = via {
        request = if Family::of(gateway) == family {
            request.attr_ip(RTA_GATEWAY, gateway)
        } else {
            // RFC 5549: an IPv4 route through an IPv6 next hop needs struct rtvia.
            request.attr(RTA_VIA, &super::netlink::via_bytes(gateway))
        };
    }
    request.attr_u32(RTA_OIF, ifindex)
}

fn describe_route(route: &runtime_info::Route) -> String {
    let mut text = route.to.to_string();
    if let Some(via) = &route.via {
        text.push_str(&format!(" via {via}"));
    }
    if route.onlink {
        text.push_str(" onlink");
    }
    text
}

/// The lines printed for a configured link: what the kernel has now, not what was asked.
pub fn describe_link(facts: &NetworkFacts, ifindex: u32) -> Vec<String> {
    let Some(link) = facts.link(ifindex) else {
        return vec![format!("network: link {ifindex} is gone")];
    };
    let addresses: Vec<String> = facts
        .addresses_of(ifindex)
        .map(|a| {
            let mut text = a.prefix().to_string();
            if a.dynamic {
                text.push_str(" dynamic");
            }
            if a.flags & IFA_F_TENTATIVE != 0 {
                text.push_str(" tentative");
            }
            text
        })
        .collect();
    let routes: Vec<String> = facts
        .routes_of(ifindex)
        .map(|r| {
            let mut text = match r.destination {
                Some(d) => d.to_string(),
                None => "default".into(),
            };
            if let Some(g) = r.gateway {
                text.push_str(&format!(" via {g}"));
            }
            if r.onlink {
                text.push_str(" onlink");
            }
            text.push_str(&format!(" proto {}", r.protocol.name()));
            text
        })
        .collect();
    let none = || "none".to_string();
    vec![
        format!(
            "network: {} {} {}: addresses: {}",
            link.name,
            link.mac.map(|m| m.to_string()).unwrap_or_default(),
            if link.up { "up" } else { "down" },
            if addresses.is_empty() {
                none()
            } else {
                addresses.join(", ")
            }
        ),
        format!(
            "network: {} routes: {}",
            link.name,
            if routes.is_empty() {
                none()
            } else {
                routes.join(", ")
            }
        ),
    ]
}

/// busybox udhcpc runs a script for each event and does nothing itself; this one applies
/// the lease with `ip` (busybox's applet or iproute2, whichever is on PATH).
///
/// Router and classless static routes (option 121) are added `onlink` so that a /32 lease
/// (Hetzner) works without a separate host route; option 121, when present, replaces the
/// router option (RFC 3442) unless it carries no default route. Untrusted server values are
/// only ever passed as quoted arguments, with globbing off.
pub const DHCP_SCRIPT: &str = r#"#!/bin/sh
# Written by nixos-kexec: applies a busybox udhcpc lease.
set -f
# The agent logs udhcpc's stdout; failed `ip` calls belong in that log.
exec 2>&1
PATH="$PATH:/bin:/sbin:/usr/bin:/usr/sbin"
run_dir="$(dirname "$0")"
# Protocol 16 is "dhcp" in rt_protos; busybox ip knows no name for it.
proto=16
case "$1" in
deconfig)
    ip link set dev "$interface" up
    ip -4 addr flush dev "$interface"
    ;;
bound|renew)
    if [ -n "$mtu" ]; then
        ip link set dev "$interface" mtu "$mtu"
    fi
    ip -4 addr flush dev "$interface"
    # No lifetime: with -q nobody renews the lease, and an install can outlast it.
    ip addr add "$ip/${mask:-32}" dev "$interface"
    have_default=
    if [ -n "$staticroutes" ]; then
        set -- $staticroutes
        while [ $# -ge 2 ]; do
            if [ "$1" = 0.0.0.0/0 ]; then
                have_default=1
            fi
            if [ "$2" = 0.0.0.0 ]; then
                ip route add "$1" dev "$interface" proto $proto
            else
                ip route add "$1" via "$2" dev "$interface" onlink proto $proto
            fi
            shift 2
        done
    fi
    if [ -z "$have_default" ]; then
        metric=0
        for r in $router; do
            ip route add default via "$r" dev "$interface" onlink metric $metric proto $proto
            metric=$((metric + 1))
        done
    fi
    echo "$dns" > "$run_dir/dhcp-dns.$interface"
    # For the agent: which NIC got a lease, and the host name the server gave (if any).
    printf '%s\n' "$ip/${mask:-32}" > "$run_dir/dhcp-lease.$interface"
    printf '%s\n' "$hostname" > "$run_dir/dhcp-hostname.$interface"
    ;;
esac
exit 0
"#;

fn write_dhcp_script(run_dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let path = run_dir.join("udhcpc.script");
    std::fs::write(&path, DHCP_SCRIPT).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", path.display()))?;
    Ok(path)
}

pub(crate) fn dhcp_command(options: &Options, interface: &str, script: &Path) -> Result<Command> {
    let Some((program, prefix)) = options.udhcpc.split_first() else {
        bail!("no DHCP client configured");
    };
    let mut command = Command::new(program);
    command.args(prefix);
    // -n: give up instead of retrying forever; -q: exit once the lease is applied, leaving it
    // configured; -t 5 -T 3: five discovers three seconds apart. Option 121 (Hetzner, Azure,
    // Oracle send routes there) and the MTU (9000 on Oracle, 1460 on GCE) are not requested
    // by default.
    command
        .args(["-i", interface, "-n", "-q", "-t", "5", "-T", "3"])
        .args(["-O", "staticroutes", "-O", "mtu", "-s"])
        .arg(script);
    Ok(command)
}

fn run_dhcp(options: &Options, interface: &str, script: &Path) -> Result<()> {
    for file in ["dhcp-dns", "dhcp-lease", "dhcp-hostname"] {
        let _ = std::fs::remove_file(options.run_dir.join(format!("{file}.{interface}")));
    }
    let mut command = dhcp_command(options, interface, script)?;
    let output = crate::machine::runner::run(&mut command).map_err(|e| {
        // udhcpc's own words for the common case; the command line is in the log already.
        if format!("{e:#}").contains("no lease") {
            anyhow::anyhow!("no DHCP lease (5 requests, 3 s apart)")
        } else {
            e
        }
    })?;
    for line in output.lines().filter(|l| !l.trim().is_empty()) {
        log::info!("udhcpc: {line}");
    }
    Ok(())
}

/// What the lease said about DNS, checked: the file holds whatever the server sent.
fn dhcp_nameservers(run_dir: &Path, interface: &str) -> Vec<IpAddr> {
    std::fs::read_to_string(run_dir.join(format!("dhcp-dns.{interface}")))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// The address a lease gave `interface`, as the DHCP script recorded it; `None`: no lease.
pub fn dhcp_lease(run_dir: &Path, interface: &str) -> Option<Prefix> {
    let text = std::fs::read_to_string(run_dir.join(format!("dhcp-lease.{interface}"))).ok()?;
    text.trim().parse().ok()
}

/// The host name the DHCP server gave (option 12), first label only and checked: the file
/// holds whatever the server sent.
pub fn dhcp_hostname(run_dir: &Path, interface: &str) -> Option<String> {
    let text = std::fs::read_to_string(run_dir.join(format!("dhcp-hostname.{interface}"))).ok()?;
    let name = text.trim().split('.').next().unwrap_or("").to_string();
    runtime_info::validate_hostname(&name).ok().map(|_| name)
}

pub fn resolv_conf_text(nameservers: &[IpAddr]) -> String {
    let mut text = String::from("# Written by nixos-kexec from the runtime info and DHCP.\n");
    for server in nameservers {
        text.push_str(&format!("nameserver {server}\n"));
    }
    text
}

pub fn write_resolv_conf(path: &Path, nameservers: &[IpAddr]) -> Result<()> {
    if nameservers.is_empty() {
        log::warn!("network: no nameservers known; names will not resolve");
    } else if nameservers.len() > 3 {
        log::warn!(
            "network: {} nameservers; the C library uses the first three",
            nameservers.len()
        );
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    // A dangling symlink (to systemd-resolved's stub) would make a plain write fail.
    let temporary = path.with_extension("nixos-kexec.tmp");
    std::fs::write(&temporary, resolv_conf_text(nameservers))
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("replacing {}", path.display()))?;
    if !nameservers.is_empty() {
        let list: Vec<String> = nameservers.iter().map(IpAddr::to_string).collect();
        log::info!("network: nameservers: {}", list.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::netlink::{self, split_messages};
    use crate::network::test_fixtures::{fixture, route, texts};

    fn body(builder: Builder) -> (u16, u16, Vec<u8>) {
        let messages = split_messages(&builder.finish(7)).unwrap();
        assert_eq!(messages.len(), 1);
        (messages[0].kind, messages[0].flags, messages[0].payload.clone())
    }

    #[test]
    fn ipv6_addresses_skip_dad_ipv4_ones_need_not() {
        let (kind, flags, payload) = body(address_request(3, "2001:db8::2/64".parse().unwrap()));
        assert_eq!(kind, RTM_NEWADDR);
        assert_ne!(flags & NLM_F_ACK, 0);
        assert_ne!(flags & NLM_F_REPLACE, 0);
        // The request decodes as the address it is meant to add.
        let parsed = facts::parse_address(&payload).unwrap();
        assert_eq!(parsed.prefix().to_string(), "2001:db8::2/64");
        assert_eq!(parsed.ifindex, 3);
        assert_eq!(parsed.flags & IFA_F_NODAD, IFA_F_NODAD);

        let (_, _, payload) = body(address_request(3, "203.0.113.10/32".parse().unwrap()));
        let parsed = facts::parse_address(&payload).unwrap();
        assert_eq!(parsed.prefix().to_string(), "203.0.113.10/32");
        assert_eq!(parsed.flags & IFA_F_NODAD, 0);
    }

    #[test]
    fn route_requests_decode_as_the_routes_meant() {
        let cases = [
            (
                route("default", Some("172.31.1.1"), true),
                "inet",
                None,
                "172.31.1.1",
                true,
            ),
            (
                route("default", Some("fe80::1"), false),
                "inet6",
                None,
                "fe80::1",
                false,
            ),
            (
                route("0.0.0.0/0", Some("fe80::1"), false),
                "inet",
                None,
                "fe80::1",
                false,
            ),
            (
                route("10.0.0.0/8", Some("192.0.2.1"), false),
                "inet",
                Some("10.0.0.0/8"),
                "192.0.2.1",
                false,
            ),
        ];
        for (r, family, dst, gw, onlink) in cases {
            let (kind, flags, payload) = body(route_request(&r, 4));
            assert_eq!(kind, RTM_NEWROUTE);
            assert_ne!(flags & NLM_F_EXCL, 0);
            let parsed = facts::parse_route(&payload);
            assert_eq!(parsed.len(), 1, "{r:?}");
            let p = &parsed[0];
            assert_eq!(serde_json::to_value(p.family).unwrap(), family, "{r:?}");
            assert_eq!(p.destination.map(|d| d.to_string()).as_deref(), dst);
            assert_eq!(p.gateway.unwrap().to_string(), gw);
            assert_eq!(p.oif, Some(4));
            assert_eq!(p.onlink, onlink);
            assert_eq!(p.protocol, facts::Protocol::STATIC);
        }
        // A device route (no gateway) is link-scoped.
        let (_, _, payload) = body(route_request(&route("10.1.0.0/16", None, false), 4));
        let p = &facts::parse_route(&payload)[0];
        assert_eq!(p.scope, facts::Scope::LINK);
    }

    #[test]
    fn link_up_request_sets_only_the_up_flag() {
        let (kind, _, payload) = body(link_up_request(9));
        assert_eq!(kind, RTM_NEWLINK);
        let info = netlink::IfInfo::parse(&payload).unwrap();
        assert_eq!((info.index, info.flags, info.change), (9, IFF_UP, IFF_UP));
    }

    #[test]
    fn azure_runtime_info_lands_on_hv_netvsc() {
        let facts = fixture("azure-accelerated");
        let network = crate::network::translate::translate(&facts, vec![]);
        let chosen = choose_link(&facts, network.interfaces[0].mac).unwrap();
        assert_eq!(chosen.name, "eth0");
        assert_eq!(chosen.driver.as_deref(), Some("hv_netvsc"));
    }

    #[test]
    fn udhcpc_command_line() {
        let options = Options {
            udhcpc: vec!["busybox".into(), "udhcpc".into()],
            ..Options::default()
        };
        let command = dhcp_command(&options, "eth0", Path::new("/run/x/udhcpc.script")).unwrap();
        assert_eq!(
            crate::machine::runner::describe(&command),
            "busybox udhcpc -i eth0 -n -q -t 5 -T 3 -O staticroutes -O mtu -s /run/x/udhcpc.script"
        );
    }

    #[test]
    fn dhcp_script_is_valid_sh() {
        let dir = tempfile::tempdir().unwrap();
        let script = write_dhcp_script(dir.path()).unwrap();
        let status = Command::new("sh").arg("-n").arg(&script).status().unwrap();
        assert!(status.success());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&script).unwrap().permissions().mode() & 0o777,
            0o755
        );
    }

    #[test]
    fn resolv_conf_and_dhcp_dns_are_written_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("dhcp-dns.eth0"),
            "192.0.2.53 junk;rm 2001:db8::53\n",
        )
        .unwrap();
        assert_eq!(
            texts(&dhcp_nameservers(dir.path(), "eth0")),
            ["192.0.2.53", "2001:db8::53"]
        );
        assert!(dhcp_nameservers(dir.path(), "eth1").is_empty());
        let path = dir.path().join("etc/resolv.conf");
        let nameservers = [
            "185.12.64.1".parse().unwrap(),
            "2a01:4ff:ff00::add:1".parse().unwrap(),
        ];
        write_resolv_conf(&path, &nameservers).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("nameserver 185.12.64.1\nnameserver 2a01:4ff:ff00::add:1\n"));
    }

    #[test]
    fn missing_mac_is_a_user_error_naming_it() {
        // This host has no link with this MAC; nothing is changed before the check fails.
        let network = Network {
            interfaces: vec![Interface {
                mac: "02:00:00:de:ad:01".parse().unwrap(),
                name: Some("eth0".into()),
                ..Interface::default()
            }],
            nameservers: vec![],
        };
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            resolv_conf: dir.path().join("resolv.conf"),
            run_dir: dir.path().to_path_buf(),
            link_timeout: Duration::from_millis(300),
            ..Options::default()
        };
        let mut socket = Socket::open().unwrap();
        let err = wait_for_macs(&mut socket, &network, &options).unwrap_err();
        let user = crate::error::as_user_error(&err).expect("a user error");
        assert!(user.problem.contains("02:00:00:de:ad:01 (was eth0)"), "{user}");
        assert!(user.problem.contains("Present: "), "{user}");
        assert!(!dir.path().join("resolv.conf").exists());
    }

    /// Runs the named test of this binary inside a fresh user + network namespace, where it
    /// may create links and change addresses without touching the host.
    fn run_in_netns(test: &str) {
        if std::env::var_os("NIXOS_KEXEC_SKIP_NETNS_TESTS").is_some() {
            eprintln!("SKIPPED {test}: NIXOS_KEXEC_SKIP_NETNS_TESTS is set");
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let bin = tempfile::tempdir().unwrap();
        // The DHCP script calls `ip`; busybox's applet is what the installer has.
        for applet in ["ip", "udhcpc", "udhcpd"] {
            std::os::unix::fs::symlink("/bin/busybox", bin.path().join(applet)).unwrap();
        }
        let path = format!(
            "{}:{}",
            bin.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let output = Command::new("unshare")
            .args(["--user", "--map-root-user", "--net", "--"])
            .arg(exe)
            .args([test, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env("NIXOS_KEXEC_IN_NETNS", "1")
            .env("PATH", path)
            .output()
            .expect("starting unshare (util-linux)");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "{test} in a network namespace failed (set NIXOS_KEXEC_SKIP_NETNS_TESTS=1 where \
             user namespaces are not allowed):\n{stdout}\n{stderr}"
        );
    }

    fn in_netns() -> bool {
        std::env::var_os("NIXOS_KEXEC_IN_NETNS").is_some()
    }

    /// Test setup uses iproute2 where the host has it (busybox `ip link add` takes no peer
    /// names), so the system directories go first; the agent itself gets busybox's `ip`.
    fn sh(script: &str) {
        let script = format!("PATH=/usr/sbin:/sbin:/usr/bin:/bin:$PATH\n{script}");
        let status = Command::new("sh").args(["-ec", &script]).status().unwrap();
        assert!(status.success(), "{script}");
    }

    #[test]
    fn applies_static_hetzner_shape_in_a_network_namespace() {
        run_in_netns("network::apply::tests::netns_static");
    }

    #[test]
    fn applies_dhcp_with_busybox_in_a_network_namespace() {
        run_in_netns("network::apply::tests::netns_dhcp");
    }

    #[test]
    #[ignore = "runs inside a network namespace, started by applies_static_hetzner_shape_in_a_network_namespace"]
    fn netns_static() {
        assert!(in_netns(), "run through the test that sets up the namespace");
        // The name differs from the runtime info's: matching is by MAC.
        sh("ip link add nk0 address 96:00:02:1a:2b:3c type veth peer name nk1");
        let network = Network {
            interfaces: vec![Interface {
                mac: "96:00:02:1A:2B:3C".parse().unwrap(),
                name: Some("eth0".into()),
                addresses: vec![
                    "203.0.113.10/32".parse().unwrap(),
                    "2001:db8:c0de:1::1/64".parse().unwrap(),
                ],
                routes: vec![
                    route("default", Some("172.31.1.1"), true),
                    route("default", Some("fe80::1"), false),
                    route("198.51.100.0/24", Some("172.31.1.1"), true),
                    route("10.7.0.0/16", None, false),
                ],
                dhcp: false,
            }],
            nameservers: vec!["185.12.64.1".parse().unwrap(), "185.12.64.2".parse().unwrap()],
        };
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            resolv_conf: dir.path().join("resolv.conf"),
            run_dir: dir.path().join("run"),
            link_timeout: Duration::from_secs(2),
            ..Options::default()
        };
        let after = apply_with(&network, &options).unwrap();
        // Applying twice changes nothing and does not fail (addresses replace, routes exist).
        let again = apply_with(&network, &options).unwrap();
        assert_eq!(again.routes, after.routes);

        let fresh = facts::gather().unwrap();
        let lo = fresh.links.iter().find(|l| l.loopback).unwrap();
        assert!(lo.up, "lo must be up");
        let nk0 = fresh.link_named("nk0").unwrap();
        assert!(nk0.up);
        let addresses: Vec<String> = fresh
            .addresses_of(nk0.ifindex)
            .filter(|a| !crate::network::is_link_local(a.address))
            .map(|a| a.prefix().to_string())
            .collect();
        assert_eq!(addresses, ["203.0.113.10/32", "2001:db8:c0de:1::1/64"]);
        let v6 = fresh
            .addresses_of(nk0.ifindex)
            .find(|a| a.address.to_string() == "2001:db8:c0de:1::1")
            .unwrap();
        assert_ne!(v6.flags & IFA_F_NODAD, 0);
        assert_eq!(v6.flags & IFA_F_TENTATIVE, 0, "usable at once");
        assert!(!v6.dynamic);

        let find = |dst: Option<&str>, gw: Option<&str>| {
            fresh
                .routes_of(nk0.ifindex)
                .find(|r| {
                    r.destination.map(|d| d.to_string()).as_deref() == dst
                        && r.gateway.map(|g| g.to_string()).as_deref() == gw
                })
                .cloned()
                .unwrap_or_else(|| panic!("no route {dst:?} via {gw:?} in {:#?}", fresh.routes))
        };
        let default4 = find(None, Some("172.31.1.1"));
        assert!(default4.onlink);
        assert_eq!(default4.family, Family::Inet);
        assert_eq!(default4.protocol, facts::Protocol::STATIC);
        let default6 = find(None, Some("fe80::1"));
        assert_eq!(default6.family, Family::Inet6);
        assert!(find(Some("198.51.100.0/24"), Some("172.31.1.1")).onlink);
        assert_eq!(find(Some("10.7.0.0/16"), None).scope, facts::Scope::LINK);
        let printed = describe_link(&fresh, nk0.ifindex);
        assert!(
            printed[0].starts_with(
                "network: nk0 96:00:02:1a:2b:3c up: addresses: 203.0.113.10/32, 2001:db8:c0de:1::1/64"
            ),
            "{printed:?}"
        );
        assert!(
            printed[1].contains("default via 172.31.1.1 onlink proto static")
                && printed[1].contains("default via fe80::1 proto static"),
            "{printed:?}"
        );

        // What the installed system would be told matches what was applied. A veth has no
        // device in sysfs (and this namespace's sysfs is the host's), so call it physical.
        let mut as_nic = fresh.clone();
        for link in as_nic.links.iter_mut().filter(|l| l.name == "nk0") {
            link.physical = true;
        }
        let translated = crate::network::translate::translate(&as_nic, network.nameservers.clone());
        assert_eq!(translated.interfaces.len(), 1);
        let t = &translated.interfaces[0];
        assert_eq!(t.mac.to_string(), "96:00:02:1a:2b:3c");
        assert_eq!(t.addresses, network.interfaces[0].addresses);
        for r in &network.interfaces[0].routes {
            assert!(t.routes.contains(r), "{r:?} not in {:?}", t.routes);
        }

        let resolv = std::fs::read_to_string(dir.path().join("resolv.conf")).unwrap();
        assert!(resolv.contains("nameserver 185.12.64.1\nnameserver 185.12.64.2\n"));
    }

    #[test]
    #[ignore = "runs inside a network namespace, started by applies_dhcp_with_busybox_in_a_network_namespace"]
    fn netns_dhcp() {
        assert!(in_netns(), "run through the test that sets up the namespace");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        // A DHCP server on the other end of a veth pair, in a namespace of its own (its
        // address must not be local to the client), handing out a /32 with a gateway outside
        // it and classless static routes, as Hetzner's does.
        sh(&format!(
            "unshare --net sleep 120 &
             server=$!
             while [ \"$(readlink /proc/$server/ns/net)\" = \"$(readlink /proc/self/ns/net)\" ]; do sleep 0.05; done
             echo $server > {d}/server.pid
             ip link add nk0 address 52:54:00:12:34:56 type veth peer name nk1 netns $server
             cat > {d}/udhcpd.conf <<EOF
start 172.31.5.10
end 172.31.5.20
interface nk1
lease_file {d}/leases
pidfile {d}/udhcpd.pid
option subnet 255.255.255.255
option router 172.31.1.1
option dns 192.0.2.53 192.0.2.54
option mtu 1400
option staticroutes 172.31.1.1/32 0.0.0.0 0.0.0.0/0 172.31.1.1 10.99.0.0/16 172.31.1.1
option lease 3600
option hostname web-7.example.net
EOF
             touch {d}/leases
             nsenter --net=/proc/$server/ns/net sh -ec '
               ip link set lo up
               ip link set nk1 up
               ip addr add 172.31.1.1/16 dev nk1
               udhcpd {d}/udhcpd.conf'"
        ));
        let network = Network {
            interfaces: vec![Interface {
                mac: "52:54:00:12:34:56".parse().unwrap(),
                name: Some("eth0".into()),
                addresses: vec!["2001:db8::5/64".parse().unwrap()],
                routes: vec![route("default", Some("fe80::1"), false)],
                dhcp: true,
            }],
            nameservers: vec!["185.12.64.1".parse().unwrap()],
        };
        let options = Options {
            resolv_conf: dir.path().join("resolv.conf"),
            run_dir: dir.path().join("run"),
            link_timeout: Duration::from_secs(2),
            ..Options::default()
        };
        let result = apply_with(&network, &options);
        let _ = Command::new("sh")
            .args(["-c", &format!("kill $(cat {d}/udhcpd.pid) $(cat {d}/server.pid)")])
            .status();
        let after = result.unwrap();
        let nk0 = after.link_named("nk0").unwrap();
        let v4: Vec<_> = after
            .addresses_of(nk0.ifindex)
            .filter(|a| a.family == Family::Inet)
            .collect();
        assert_eq!(v4.len(), 1, "{v4:?}");
        assert_eq!(v4[0].prefix, 32);
        assert!("172.31.5.0/24".parse::<Prefix>().unwrap().contains(v4[0].address));
        assert_eq!(nk0.mtu, Some(1400));
        let routes: Vec<String> = after
            .routes_of(nk0.ifindex)
            .map(|r| {
                format!(
                    "{} {} {} {}",
                    r.destination.map(|d| d.to_string()).unwrap_or("default".into()),
                    r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                    r.onlink,
                    r.protocol.name()
                )
            })
            .collect();
        for expected in [
            "default 172.31.1.1 true dhcp",
            "10.99.0.0/16 172.31.1.1 true dhcp",
            "172.31.1.1/32  false dhcp",
            "default fe80::1 false static",
        ] {
            assert!(
                routes.iter().any(|r| r == expected),
                "{expected:?} not in {routes:#?}"
            );
        }
        assert!(after
            .addresses_of(nk0.ifindex)
            .any(|a| a.prefix().to_string() == "2001:db8::5/64"));
        let run = dir.path().join("run");
        let lease = dhcp_lease(&run, "nk0").expect("the lease is recorded");
        assert_eq!(lease.to_string(), format!("{}/32", v4[0].address));
        assert_eq!(dhcp_hostname(&run, "nk0").as_deref(), Some("web-7"));
        let resolv = std::fs::read_to_string(dir.path().join("resolv.conf")).unwrap();
        assert!(
            resolv.contains("nameserver 185.12.64.1\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n"),
            "{resolv}"
        );
    }
}
