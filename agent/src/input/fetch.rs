//! `nixos_kexec.config_url=`: runtime info from a config server, one document per machine.
//!
//! The URL may name the machine with `${mac}`, `${serial}`, `${uuid}` and `${hostname}`. iPXE
//! expands its own `${mac}` inside its scripts before the kernel starts; from a GRUB console
//! (where `${...}` must be single-quoted so GRUB leaves it alone) the installer does it here.

use crate::console;
use crate::error::{as_user_error, user_error};
use crate::input::http;
use crate::input::runtime_info::{self, RuntimeInfo, Source};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What `${...}` in a config or report URL can name. `None`: unknown on this machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineVars {
    /// The NIC that got the lease (or carries the default route), lower-case with colons.
    pub mac: Option<String>,
    /// DMI product serial.
    pub serial: Option<String>,
    /// DMI product UUID, lower-case.
    pub uuid: Option<String>,
    /// From the parameters or runtime info, else from the DHCP server.
    pub hostname: Option<String>,
}

pub const VARIABLES: [&str; 4] = ["mac", "serial", "uuid", "hostname"];

/// Values firmware vendors leave in DMI when nobody set them; a URL built from one would
/// give every such machine the same runtime info (and the same disk and hostname).
const PLACEHOLDERS: [&str; 9] = [
    "",
    "none",
    "not specified",
    "not applicable",
    "to be filled by o.e.m.",
    "default string",
    "system serial number",
    "0123456789",
    "n/a",
];

fn usable_dmi(text: &str) -> Option<String> {
    let text = text.trim();
    let lower = text.to_ascii_lowercase();
    let blank = lower.chars().all(|c| c == '0' || c == '-') || lower.chars().all(|c| c == 'f' || c == '-');
    (!PLACEHOLDERS.contains(&lower.as_str()) && !blank).then(|| text.to_string())
}

impl MachineVars {
    /// Reads the DMI serial and UUID from `root/sys/class/dmi/id` (`/` on a real system).
    pub fn read_dmi(root: &Path) -> (Option<String>, Option<String>) {
        let dir = root.join("sys/class/dmi/id");
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .ok()
                .and_then(|t| usable_dmi(&t))
        };
        (
            read("product_serial"),
            read("product_uuid").map(|u| u.to_ascii_lowercase()),
        )
    }

    fn value(&self, name: &str) -> Option<&str> {
        match name {
            "mac" => self.mac.as_deref(),
            "serial" => self.serial.as_deref(),
            "uuid" => self.uuid.as_deref(),
            "hostname" => self.hostname.as_deref(),
            _ => None,
        }
    }
}

fn why_unknown(name: &str) -> &'static str {
    match name {
        "mac" => "no network interface got a DHCP lease or carries a default route",
        "serial" => "the firmware reports no usable serial number (/sys/class/dmi/id/product_serial)",
        "uuid" => "the firmware reports no usable UUID (/sys/class/dmi/id/product_uuid)",
        _ => "neither nixos_kexec.hostname= nor the DHCP server gave a host name",
    }
}

/// Percent-encodes a substituted value for a URL path or query (MAC colons stay readable).
fn encode(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Replaces `${mac}`, `${serial}`, `${uuid}`, `${hostname}` in the URL the `nixos_kexec.`
/// `parameter` gives; anything else in `${...}` is an error, as is a variable whose value this
/// machine does not have.
pub fn substitute(parameter: &str, template: &str, vars: &MachineVars) -> Result<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| {
            user_error(
                format!(
                    "nixos_kexec.{parameter}={} has a ${{ without a closing }}.",
                    http::redact(template)
                ),
                format!(
                    "write variables as ${{name}}; known names: {}.",
                    VARIABLES.join(", ")
                ),
            )
        })?;
        let name = &after[..end];
        if !VARIABLES.contains(&name) {
            return Err(user_error(
                format!(
                    "nixos_kexec.{parameter}={} uses ${{{name}}}, which this installer does not know.",
                    http::redact(template)
                ),
                format!("use one of ${{{}}}.", VARIABLES.join("}, ${")),
            ));
        }
        let value = vars.value(name).ok_or_else(|| {
            user_error(
                format!(
                    "nixos_kexec.{parameter}={} uses ${{{name}}}, but {}.",
                    http::redact(template),
                    why_unknown(name)
                ),
                "name the machine another way in the URL, or write the value into the URL yourself.",
            )
        })?;
        out.push_str(&encode(value));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Substitutes, fetches and validates the runtime info behind a config URL.
pub fn runtime_info(template: &str, vars: &MachineVars, options: &http::Options) -> Result<RuntimeInfo> {
    let url = substitute("config_url", template, vars)?;
    // Shown without a token the query string or user part may carry.
    let shown = http::redact(&url);
    if url != template {
        console::line(&format!(
            "config_url: {} is {shown} on this machine",
            http::redact(template)
        ));
    }
    console::line(&format!("config_url: fetching {shown}"));
    let body = http::get(&url, options, &mut |line| {
        console::line(&format!("config_url: {line}"))
    })?;
    let info =
        runtime_info::parse_json(&body, Source::ConfigUrl, false).map_err(|e| match as_user_error(&e) {
            // Name the URL: the same template gives every machine its own document.
            Some(user) => user_error(
                format!("{} (fetched from {shown})", user.problem),
                user.fix.clone(),
            ),
            None => e,
        })?;
    console::line(&format!(
        "config_url: got {} bytes of runtime info from {shown}",
        body.len()
    ));
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> MachineVars {
        MachineVars {
            mac: Some("52:54:00:12:34:56".into()),
            serial: Some("ABC 123/x".into()),
            uuid: Some("4c4c4544-0042-3510-8051-b4c04f4e4b32".into()),
            hostname: None,
        }
    }

    #[test]
    fn substitutes_known_variables() {
        assert_eq!(
            substitute("config_url", "http://10.0.2.2:8080/${mac}.json", &vars()).unwrap(),
            "http://10.0.2.2:8080/52:54:00:12:34:56.json"
        );
        assert_eq!(
            substitute("config_url", "http://c/?s=${serial}&u=${uuid}&m=${mac}", &vars()).unwrap(),
            "http://c/?s=ABC%20123%2Fx&u=4c4c4544-0042-3510-8051-b4c04f4e4b32&m=52:54:00:12:34:56"
        );
        assert_eq!(
            substitute("config_url", "http://c/plain$x.json", &vars()).unwrap(),
            "http://c/plain$x.json"
        );
    }

    #[test]
    fn unknown_unclosed_and_missing_variables_are_user_errors() {
        for (template, needle) in [
            ("http://c/${nope}.json", "${nope}"),
            ("http://c/${mac.json", "without a closing"),
            ("http://c/${hostname}.json", "neither nixos_kexec.hostname="),
        ] {
            let err = substitute("config_url", template, &vars()).unwrap_err();
            let user = as_user_error(&err).expect("a user error");
            assert!(user.problem.contains(needle), "{template}: {user}");
        }
        let no_mac = MachineVars::default();
        let err = substitute("config_url", "http://c/${mac}", &no_mac).unwrap_err();
        assert!(crate::error::one_line(&err).contains("DHCP lease"), "{err}");
    }

    #[test]
    fn dmi_placeholders_are_not_identities() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("sys/class/dmi/id");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("product_serial"), "To Be Filled By O.E.M.\n").unwrap();
        std::fs::write(dir.join("product_uuid"), "00000000-0000-0000-0000-000000000000\n").unwrap();
        assert_eq!(MachineVars::read_dmi(root.path()), (None, None));
        std::fs::write(dir.join("product_serial"), "CZ1234XYZ\n").unwrap();
        std::fs::write(dir.join("product_uuid"), "4C4C4544-0042-3510-8051-B4C04F4E4B32\n").unwrap();
        assert_eq!(
            MachineVars::read_dmi(root.path()),
            (
                Some("CZ1234XYZ".into()),
                Some("4c4c4544-0042-3510-8051-b4c04f4e4b32".into())
            )
        );
        assert_eq!(MachineVars::read_dmi(Path::new("/nonexistent")), (None, None));
    }
}
