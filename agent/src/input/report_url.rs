//! `report_url`: where the installer POSTs its progress events ([`crate::installer::phone_home`]),
//! as the operator wrote it. Like `config_url` it may name the machine with `${mac}`,
//! `${serial}`, `${uuid}` and `${hostname}`, which are known only once the network is up: the
//! URL is checked when it is read, and made for this machine when the events start.

use crate::error::{as_user_error, user_error};
use crate::input::binary_cache::serde_as_text;
use crate::input::fetch::{self, MachineVars};
use crate::input::http::{self, Url};
use anyhow::Result;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

const PARAMETER: &str = "report_url";

/// An `http://` or `https://` URL whose `${...}` name only known variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportUrl {
    template: String,
}

impl ReportUrl {
    pub fn parse(text: &str) -> Result<ReportUrl> {
        // Unknown and unclosed `${` are refused now, not when the events start: the stand-ins
        // are there only so that no variable lacks a value.
        let stand_ins = MachineVars {
            mac: Some("52:54:00:00:00:00".into()),
            serial: Some("serial".into()),
            uuid: Some("uuid".into()),
            hostname: Some("hostname".into()),
        };
        fetch::substitute(PARAMETER, text, &stand_ins)?;
        // The template as it is: a variable's value only ever lands percent-encoded in it.
        Url::parse(text).map_err(|e| match as_user_error(&e) {
            Some(user) => user_error(
                format!("nixos_kexec.{PARAMETER}: {}", user.problem),
                user.fix.clone(),
            ),
            None => e,
        })?;
        Ok(ReportUrl {
            template: text.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.template
    }

    /// The URL with this machine's values in place of its variables; an error names a
    /// variable whose value this machine does not have.
    pub fn resolve(&self, vars: &MachineVars) -> Result<Url> {
        Url::parse(&fetch::substitute(PARAMETER, &self.template, vars)?)
    }
}

/// Shown without a token its query string or user part may carry.
impl fmt::Display for ReportUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&http::redact(&self.template))
    }
}

serde_as_text!(ReportUrl, as_str);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_is_checked_when_read_and_resolved_per_machine() {
        let url = ReportUrl::parse("https://fleet.example:8443/report/${mac}?s=${serial}").unwrap();
        let vars = MachineVars {
            mac: Some("52:54:00:12:34:56".into()),
            serial: Some("CZ 12/3".into()),
            ..MachineVars::default()
        };
        let resolved = url.resolve(&vars).unwrap();
        assert_eq!(resolved.host, "fleet.example");
        assert_eq!(resolved.port, 8443);
        assert_eq!(resolved.path, "/report/52:54:00:12:34:56?s=CZ%2012%2F3");
        assert_eq!(
            url.to_string(),
            "https://fleet.example:8443/report/${mac}?<hidden>"
        );
        let no_serial = url.resolve(&MachineVars::default()).unwrap_err();
        assert!(
            crate::error::one_line(&no_serial).contains("nixos_kexec.report_url="),
            "{no_serial}"
        );
    }

    #[test]
    fn anything_but_an_http_url_with_known_variables_is_refused() {
        for (text, needle) in [
            ("ftp://fleet.example/x", "does not start with http:// or https://"),
            ("fleet.example/report", "does not start with http:// or https://"),
            ("http://fleet.example/${nope}", "${nope}"),
            ("http://fleet.example/${mac", "without a closing"),
            ("http://fleet.example/a b", "spaces"),
        ] {
            let err = ReportUrl::parse(text).unwrap_err();
            let user = as_user_error(&err).unwrap_or_else(|| panic!("{text}: {err:#}"));
            assert!(user.problem.contains("nixos_kexec.report_url"), "{user}");
            assert!(user.problem.contains(needle), "{text}: {user}");
        }
    }

    #[test]
    fn serde_reads_and_writes_the_template() {
        let url: ReportUrl = serde_json::from_str(r#""http://10.0.2.2:8080/r/${mac}""#).unwrap();
        assert_eq!(url.as_str(), "http://10.0.2.2:8080/r/${mac}");
        assert_eq!(
            serde_json::to_string(&url).unwrap(),
            r#""http://10.0.2.2:8080/r/${mac}""#
        );
        assert!(serde_json::from_str::<ReportUrl>(r#""gopher://x/""#).is_err());
    }
}
