//! Lines of an OpenSSH `authorized_keys` file, read as sshd(8) reads them ("AUTHORIZED_KEYS
//! FILE FORMAT"): optional options, the key type, the base64 key, an optional comment.
//!
//! Options are kept verbatim: `restrict,command=...` or `cert-authority,principals=...` give a
//! key its meaning, and dropping them would turn a restricted key into root's master key or
//! lock out users who log in with certificates. The one exception is the line cloud images put
//! in root's file to send users to another account; its key is the operator's, taken without
//! that option.

use crate::error::user_error;
use anyhow::Result;

/// The key types sshd takes in authorized_keys (OpenSSH 9, DSA being gone from OpenSSH 10).
pub const KEY_TYPES: [&str; 7] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizedKey {
    /// As written, e.g. `restrict,command="uptime"`.
    pub options: Option<String>,
    /// `ssh-ed25519 AAAA... comment`, checked by the ssh-key crate.
    pub key: String,
}

impl AuthorizedKey {
    /// One line, with or without options.
    pub fn parse(line: &str) -> Result<AuthorizedKey> {
        let line = line.trim();
        let (options, key) = if starts_with_key_type(line) {
            (None, line)
        } else {
            let end = options_end(line).ok_or_else(|| not_a_key(line, "an unclosed quote in its options"))?;
            let (options, rest) = line.split_at(end);
            (Some(options.to_string()), rest.trim_start())
        };
        if !starts_with_key_type(key) {
            return Err(not_a_key(line, "no key type this installer knows"));
        }
        ssh_key::PublicKey::from_openssh(key).map_err(|e| not_a_key(line, &e.to_string()))?;
        Ok(AuthorizedKey {
            options,
            key: key.to_string(),
        })
    }

    /// The line sshd reads.
    pub fn line(&self) -> String {
        match &self.options {
            Some(options) => format!("{options} {}", self.key),
            None => self.key.clone(),
        }
    }

    /// Cloud images (Ubuntu, Debian, Amazon Linux) put the operator's key into root's file
    /// with a forced command that only says to log in as another user.
    pub fn is_cloud_redirect(&self) -> bool {
        self.options
            .as_deref()
            .is_some_and(|o| o.contains("command=") && o.contains("Please login as the user"))
    }
}

/// The keys of an authorized_keys file. Comments and blank lines are skipped; so are lines that
/// are no key, which sshd ignores too. The cloud redirect's option is dropped.
pub fn parse_file(text: &str) -> Vec<AuthorizedKey> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| AuthorizedKey::parse(l).ok())
        .map(|mut key| {
            if key.is_cloud_redirect() {
                key.options = None;
            }
            key
        })
        .collect()
}

fn starts_with_key_type(text: &str) -> bool {
    let first = text.split_ascii_whitespace().next().unwrap_or("");
    KEY_TYPES.contains(&first)
}

/// Where the options field ends: at the first blank outside double quotes (a `\"` inside
/// quotes does not close them).
fn options_end(line: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ' ' | '\t' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

fn not_a_key(line: &str, why: &str) -> anyhow::Error {
    let start: String = line.chars().take(24).collect();
    user_error(
        format!("SSH authorized key starting {start:?} is not an OpenSSH public key ({why})."),
        "pass the whole line of an id_*.pub file, e.g. \"ssh-ed25519 AAAA... me@host\", or an authorized_keys line with its options.",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG1I/9iAkoeXOthTVOzsjMVNHr/NoG7tXzkXLJ5R4vxD me@host";
    const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBP9GzquYTqn4kEtWAjA+balCHzQwaPr/lE11roCNUTgwdaDYbPzdd7RNrU+UWrURM4mIX5P+zTTH/Nm/lygm1Rw= me@host";
    const SK: &str = "sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29tAAAAIAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gAAAABHNzaDo= yubikey";
    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwQ== rsa@host";

    #[test]
    fn every_key_type_sshd_takes() {
        for line in [ED25519, ECDSA, SK, RSA] {
            let key = AuthorizedKey::parse(line).unwrap();
            assert_eq!(key.options, None);
            assert_eq!(key.line(), line);
        }
        let rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC7 x";
        assert!(AuthorizedKey::parse(rsa).is_err(), "a cut RSA key is no key");
    }

    #[test]
    fn options_are_kept_verbatim() {
        for options in [
            r#"restrict,command="/usr/bin/uptime",from="10.0.0.0/8""#,
            r#"cert-authority,principals="alice,bob""#,
            r#"command="echo \"ssh-ed25519 in quotes\"; exit",no-pty"#,
        ] {
            let line = format!("{options} {ED25519}");
            let key = AuthorizedKey::parse(&line).unwrap();
            assert_eq!(key.options.as_deref(), Some(options));
            assert_eq!(key.key, ED25519);
            assert_eq!(key.line(), line);
        }
        // `ssh-` inside the sk key type is not where the key starts.
        let key = AuthorizedKey::parse(&format!("no-touch-required {SK}")).unwrap();
        assert_eq!(key.key, SK);
    }

    #[test]
    fn the_cloud_images_redirect_is_the_only_option_dropped() {
        let text = format!(
            "# keys\n\nno-port-forwarding,no-agent-forwarding,no-X11-forwarding,command=\"echo 'Please login as the user \\\"debian\\\" rather than the user \\\"root\\\".';echo;sleep 10;exit 142\" {ED25519}\nrestrict {ECDSA}\ngarbage line\n"
        );
        let keys = parse_file(&text);
        let lines: Vec<String> = keys.iter().map(AuthorizedKey::line).collect();
        assert_eq!(lines, [ED25519.to_string(), format!("restrict {ECDSA}")]);
    }

    #[test]
    fn what_is_not_a_key_is_named() {
        for line in [
            "",
            "ssh-ed25519",
            "ssh-ed25519 AAAA me",
            "restrict",
            "command=\"open quote ssh-ed25519 AAAA",
        ] {
            let err = AuthorizedKey::parse(line).unwrap_err();
            assert!(
                crate::error::one_line(&err).contains("is not an OpenSSH public key"),
                "{line}: {err}"
            );
        }
    }
}
