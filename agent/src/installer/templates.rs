//! Fills the host-flake templates kept in `nix/templates/host/` (reviewed Nix, embedded here).
//!
//! Templates stay valid Nix so CI can parse them: a value sits inside a string as `@name@`,
//! a generated block sits in a comment as `/*@name@*/`.

use anyhow::{bail, Result};

pub const FLAKE: &str = include_str!("../../../nix/templates/host/flake.nix");
pub const FLAKE_WITH_CONFIGURATION: &str =
    include_str!("../../../nix/templates/host/flake-with-configuration.nix");
pub const CONFIGURATION: &str = include_str!("../../../nix/templates/host/configuration.nix");
pub const HARDWARE: &str = include_str!("../../../nix/templates/host/hardware-configuration.nix");
pub const PERSIST: &str = include_str!("../../../nix/templates/host/persist.nix");
pub const INITRD_SSH: &str = include_str!("../../../nix/templates/host/initrd-ssh.nix");

pub enum Value {
    /// Goes inside an existing Nix string; escaped.
    Text(String),
    /// Replaces a `/*@name@*/` comment with Nix written by the caller.
    Block(String),
}

/// Fills every placeholder of `template` in one pass: a value goes in as data and is never
/// read for placeholders again, so an SSH key comment or hostname holding `@word@` (or
/// another value's placeholder) stays as written. A placeholder without a value is a bug.
pub fn render(template: &str, values: &[(&str, Value)]) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find('@') {
        let Some(placeholder) = Placeholder::at(rest, at) else {
            if rest[..at].ends_with("/*") {
                let left: String = rest[at - 2..].chars().take(40).collect();
                bail!("template block placeholder {left:?} is malformed (a bug in nixos-kexec)");
            }
            out.push_str(&rest[..=at]);
            rest = &rest[at + 1..];
            continue;
        };
        let value = values.iter().find(|(name, _)| *name == placeholder.name);
        let filled = match (value, placeholder.block) {
            (Some((_, Value::Text(text))), false) => escape_in_string(text),
            (Some((_, Value::Block(nix))), true) => nix.clone(),
            _ => {
                let left: String = rest[placeholder.start..].chars().take(40).collect();
                bail!("template placeholder left unfilled at {left:?} (a bug in nixos-kexec)");
            }
        };
        out.push_str(&rest[..placeholder.start]);
        out.push_str(&filled);
        rest = &rest[placeholder.end..];
    }
    out.push_str(rest);
    Ok(tidy(&out))
}

/// A placeholder in a template: `@name@` inside a string, or a `/*@name@*/` block.
struct Placeholder<'a> {
    start: usize,
    end: usize,
    name: &'a str,
    block: bool,
}

impl Placeholder<'_> {
    /// The placeholder whose first `@` is at `at` in `text`, if that `@` begins one (an email
    /// address in a comment does not).
    fn at(text: &str, at: usize) -> Option<Placeholder<'_>> {
        let after = &text[at + 1..];
        let len = after.find(|c: char| !(c.is_ascii_lowercase() || c == '_'))?;
        if len == 0 || !after[len..].starts_with('@') {
            return None;
        }
        let end = at + len + 2;
        let block = text[..at].ends_with("/*") && text[end..].starts_with("*/");
        Some(Placeholder {
            start: if block { at - 2 } else { at },
            end: if block { end + 2 } else { end },
            name: &after[..len],
            block,
        })
    }
}

/// An empty block leaves its indentation behind: such lines become empty, and a run of empty
/// lines becomes one, so the file reads as if written by hand.
fn tidy(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank_before = false;
    for line in text.split_inclusive('\n') {
        let blank = line.trim().is_empty();
        if blank && blank_before {
            continue;
        }
        blank_before = blank;
        out.push_str(if blank {
            if line.ends_with('\n') {
                "\n"
            } else {
                ""
            }
        } else {
            line
        });
    }
    out
}

/// Escapes text for a double-quoted Nix string.
pub fn escape_in_string(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace("${", "\\${")
        .replace('\n', "\\n")
}

/// A double-quoted Nix string.
pub fn string(text: &str) -> String {
    format!("\"{}\"", escape_in_string(text))
}

/// List items, one per line at the given indentation (the template holds the brackets).
pub fn list_lines(items: &[impl ToString], indent: usize) -> String {
    let pad = " ".repeat(indent);
    items
        .iter()
        .map(|i| string(&i.to_string()))
        .collect::<Vec<_>>()
        .join(&format!("\n{pad}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_fills() {
        let out = render(
            "x = \"@a@\"; y = [ /*@b@*/ ];",
            &[
                ("a", Value::Text("q\"${x}".into())),
                ("b", Value::Block(list_lines(&["m", "n"], 0))),
            ],
        )
        .unwrap();
        assert_eq!(out, "x = \"q\\\"\\${x}\"; y = [ \"m\"\n\"n\" ];");
    }

    #[test]
    fn empty_blocks_leave_no_whitespace_lines() {
        let out = render(
            "{\n  a = 1;\n\n  /*@b@*/\n\n  c = 2;\n}\n",
            &[("b", Value::Block(String::new()))],
        )
        .unwrap();
        assert_eq!(out, "{\n  a = 1;\n\n  c = 2;\n}\n");
    }

    #[test]
    fn leftover_placeholder_is_an_error() {
        assert!(render("x = \"@a@\";", &[]).is_err());
        assert!(render("x = [ /*@b@*/ ];", &[]).is_err());
        // An email address in a key comment is not a placeholder.
        assert!(render("x = \"me@host\";", &[]).is_ok());
        // A value of the wrong kind does not fill it.
        assert!(render("x = [ /*@b@*/ ];", &[("b", Value::Text("t".into()))]).is_err());
        assert!(render("x = [ /*@B@*/ ];", &[]).is_err());
    }

    /// Values are data: what looks like a placeholder inside one (an SSH key comment
    /// `deploy@build@`, another value's name) is written as it is.
    #[test]
    fn values_holding_placeholders_stay_as_written() {
        let out = render(
            "a = \"@a@\"; b = [ /*@b@*/ ]; c = \"@c@\";",
            &[
                ("a", Value::Text("key deploy@build@ @c@ /*@b@*/".into())),
                ("b", Value::Block(list_lines(&["ssh-ed25519 AAAA me@word@"], 0))),
                ("c", Value::Text("@a@".into())),
            ],
        )
        .unwrap();
        assert_eq!(
            out,
            "a = \"key deploy@build@ @c@ /*@b@*/\"; b = [ \"ssh-ed25519 AAAA me@word@\" ]; c = \"@a@\";"
        );
    }
}
