//! Network values: MAC addresses, address prefixes, route destinations and IP addresses.
//!
//! Each parses from and prints as the one text form runtime info carries (`52:54:00:12:34:56`,
//! `192.0.2.10/24`, `default`), so the runtime-info JSON is checked once, when it is read, and
//! everything after it works on these types. A value that does not parse is refused with its
//! own problem and fix (see [`refused_value`]).

use crate::error::UserError;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::cell::RefCell;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An Ethernet hardware address; prints lower-case and colon-separated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// `None` unless `bytes` is six bytes long: tunnels have no hardware address, InfiniBand
    /// a 20-byte one.
    pub fn from_bytes(bytes: &[u8]) -> Option<MacAddr> {
        <[u8; 6]>::try_from(bytes).ok().map(MacAddr)
    }

    /// Loopback's all-zero address, which names no NIC.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = UserError;

    /// Six hex pairs, in either case.
    fn from_str(text: &str) -> Result<MacAddr, UserError> {
        let bad = || UserError {
            problem: format!("{text:?} is not a MAC address."),
            fix: "write MAC addresses as six hex pairs, e.g. 52:54:00:12:34:56.".into(),
        };
        let mut bytes = [0u8; 6];
        let mut pairs = text.split(':');
        for byte in &mut bytes {
            let pair = pairs.next().ok_or_else(bad)?;
            if pair.len() != 2 || !pair.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        if pairs.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(bytes))
    }
}

/// An address with prefix length (`192.0.2.10/24`): an interface address, or a route
/// destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// Clamps the length to the family's width so that `contains` cannot overflow.
    pub fn new(addr: IpAddr, len: u8) -> Prefix {
        Prefix {
            addr,
            len: len.min(family_width(addr)),
        }
    }

    pub fn is_host(&self) -> bool {
        self.len == family_width(self.addr)
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

fn family_width(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = UserError;

    /// CIDR: an address, a slash, and a length no wider than the address's family.
    fn from_str(text: &str) -> Result<Prefix, UserError> {
        let bad = || UserError {
            problem: format!("{text:?} is not an address with prefix length."),
            fix: "write addresses as CIDR, e.g. 192.0.2.10/32 or 2001:db8::1/64.".into(),
        };
        let (addr, len) = text.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        if len > family_width(addr) {
            return Err(bad());
        }
        Ok(Prefix { addr, len })
    }
}

/// Where a runtime-info route leads: `default`, whose family comes from the gateway (IPv4
/// without one), or a prefix. `0.0.0.0/0` and `::/0` stay prefixes, so that an IPv4 default
/// through an IPv6 gateway keeps its family.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Destination {
    #[default]
    Default,
    Prefix(Prefix),
}

impl Destination {
    /// `default`, `0.0.0.0/0` or `::/0`.
    pub fn is_default(&self) -> bool {
        match self {
            Destination::Default => true,
            Destination::Prefix(p) => p.len == 0 && p.addr.is_unspecified(),
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Default => f.write_str("default"),
            Destination::Prefix(p) => p.fmt(f),
        }
    }
}

impl FromStr for Destination {
    type Err = UserError;

    fn from_str(text: &str) -> Result<Destination, UserError> {
        if text == "default" {
            Ok(Destination::Default)
        } else {
            text.parse().map(Destination::Prefix)
        }
    }
}

/// An IP address as runtime info writes gateways and nameservers.
pub fn parse_ip(text: &str) -> Result<IpAddr, UserError> {
    text.parse().map_err(|_| UserError {
        problem: format!("{text:?} is not an IP address."),
        fix: "write addresses like 192.0.2.10 or 2001:db8::1.".into(),
    })
}

thread_local! {
    /// The value a deserialiser refused last, with the problem and fix its parser gave:
    /// serde_json keeps only the text of a custom error.
    static REFUSED: RefCell<Option<UserError>> = const { RefCell::new(None) };
}

fn refuse<E: de::Error>(error: UserError) -> E {
    let custom = E::custom(&error);
    REFUSED.with(|refused| *refused.borrow_mut() = Some(error));
    custom
}

/// The user error (problem and fix) of the value whose refusal made `error`, so that bad
/// runtime info reads the same as any other bad input; `None` for other errors.
pub fn refused_value(error: &serde_json::Error) -> Option<UserError> {
    let refused = REFUSED.with(|refused| refused.borrow_mut().take())?;
    // A refusal recorded by an earlier deserialisation is not this error's cause.
    error
        .to_string()
        .starts_with(&refused.to_string())
        .then_some(refused)
}

fn parse_text<'de, D, T>(deserializer: D, parse: impl Fn(&str) -> Result<T, UserError>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    let text = String::deserialize(deserializer)?;
    parse(&text).map_err(refuse)
}

macro_rules! serde_as_text {
    ($($type:ty),*) => {$(
        impl Serialize for $type {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                parse_text(deserializer, str::parse)
            }
        }
    )*};
}

serde_as_text!(MacAddr, Prefix, Destination);

/// `deserialize_with` for a list of IP addresses, refused with [`parse_ip`]'s error.
pub fn deserialize_ips<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<IpAddr>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|text| parse_ip(text).map_err(refuse))
        .collect()
}

/// `deserialize_with` for an optional IP address, refused with [`parse_ip`]'s error.
pub fn deserialize_optional_ip<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<IpAddr>, D::Error> {
    Option::<String>::deserialize(deserializer)?
        .map(|text| parse_ip(&text).map_err(refuse))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(text: &str) -> Prefix {
        text.parse().unwrap()
    }

    #[test]
    fn prefixes_contain_what_they_should() {
        let p = prefix("10.0.0.0/24");
        assert!(p.contains("10.0.0.1".parse().unwrap()));
        assert!(!p.contains("10.0.1.1".parse().unwrap()));
        assert!(!p.contains("::1".parse().unwrap()));
        let host = prefix("203.0.113.10/32");
        assert!(host.is_host());
        assert!(!host.contains("172.31.1.1".parse().unwrap()));
        let all = prefix("::/0");
        assert!(all.contains("2001:db8::1".parse().unwrap()));
        let v6 = prefix("2001:db8:c0de:1::1/64");
        assert!(v6.contains("2001:db8:c0de:1::ffff".parse().unwrap()));
        assert!(!v6.contains("2001:db8:c0de:2::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Prefix>().is_err());
        assert!("10.0.0.0".parse::<Prefix>().is_err());
        assert!("::/129".parse::<Prefix>().is_err());
        assert_eq!(Prefix::new("::".parse().unwrap(), 200).len, 128);
    }

    #[test]
    fn values_print_as_they_are_written() {
        for text in ["192.0.2.10/24", "2001:db8:c0de:1::1/64", "0.0.0.0/0", "::/0"] {
            assert_eq!(prefix(text).to_string(), text);
            assert_eq!(text.parse::<Destination>().unwrap().to_string(), text);
        }
        assert_eq!("default".parse::<Destination>().unwrap(), Destination::Default);
        assert_eq!(Destination::Default.to_string(), "default");
        let mac: MacAddr = "96:00:02:1A:2b:3C".parse().unwrap();
        assert_eq!(mac.to_string(), "96:00:02:1a:2b:3c");
        assert_eq!(mac, MacAddr([0x96, 0, 2, 0x1a, 0x2b, 0x3c]));
        assert_eq!(MacAddr::from_bytes(&mac.0), Some(mac));
        assert_eq!(MacAddr::from_bytes(&[10, 0, 0, 1]), None);
        assert!(MacAddr::default().is_zero() && !mac.is_zero());
    }

    #[test]
    fn bad_values_are_refused_naming_value_and_fix() {
        for bad in [
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5g",
            "+2:54:00:12:34:56",
            "",
        ] {
            let err = bad.parse::<MacAddr>().unwrap_err();
            assert_eq!(err.problem, format!("{bad:?} is not a MAC address."));
            assert!(err.fix.contains("six hex pairs"), "{err}");
        }
        let err = "bogus".parse::<Destination>().unwrap_err();
        assert_eq!(err.problem, "\"bogus\" is not an address with prefix length.");
        assert!(err.fix.contains("CIDR"), "{err}");
        let err = parse_ip("192.0.2.300").unwrap_err();
        assert_eq!(err.problem, "\"192.0.2.300\" is not an IP address.");
    }

    #[test]
    fn a_refusal_inside_json_comes_back_as_its_user_error() {
        let err = serde_json::from_str::<Vec<MacAddr>>(r#"["52:54:00:12:34:56", "nope"]"#).unwrap_err();
        let refused = refused_value(&err).expect("the MAC's own error");
        assert_eq!(refused.problem, "\"nope\" is not a MAC address.");
        // Taken once; an error of another kind finds nothing.
        let err = serde_json::from_str::<Vec<MacAddr>>(r#"["52:54:00:12:34:56", 7]"#).unwrap_err();
        assert_eq!(refused_value(&err), None);
        // A stale refusal is not blamed for a later, different error.
        let _stale = serde_json::from_str::<Prefix>(r#""x""#).unwrap_err();
        let other = serde_json::from_str::<Prefix>("5").unwrap_err();
        assert_eq!(refused_value(&other), None);
    }
}
