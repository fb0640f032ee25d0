//! Fills the host-flake templates kept in `nix/templates/host/` (reviewed Nix, embedded here).
//!
//! Templates stay valid Nix so CI can parse them: a value sits inside a string as `@name@`,
//! a generated block sits in a comment as `/*@name@*/`.

use anyhow::{bail, Result};

pub const FLAKE: &str = include_str!("../../../nix/templates/host/flake.nix");
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

pub fn render(template: &str, values: &[(&str, Value)]) -> Result<String> {
    let mut out = template.to_string();
    for (name, value) in values {
        match value {
            Value::Text(text) => out = out.replace(&format!("@{name}@"), &escape_in_string(text)),
            Value::Block(nix) => out = out.replace(&format!("/*@{name}@*/"), nix),
        }
    }
    if let Some(start) = out.find("/*@").or_else(|| find_placeholder(&out)) {
        let rest: String = out[start..].chars().take(40).collect();
        bail!("template placeholder left unfilled at {rest:?} (a bug in nixos-kexec)");
    }
    Ok(tidy(&out))
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

fn find_placeholder(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    (0..bytes.len()).find(|&i| {
        bytes[i] == b'@'
            && bytes[i + 1..].iter().position(|&b| b == b'@').is_some_and(|len| {
                len > 0
                    && bytes[i + 1..i + 1 + len]
                        .iter()
                        .all(|b| b.is_ascii_lowercase() || *b == b'_')
            })
    })
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
    }
}
