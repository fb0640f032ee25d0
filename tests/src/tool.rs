//! Running external tools with errors that carry the whole command line and its output.

use std::ffi::OsStr;
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{bail, Context, Result};

/// What a finished external command produced.
#[derive(Debug, Clone)]
pub struct ToolOutput {
    /// The command line, shell-quoted (for messages).
    pub command: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    /// stderr, lossily decoded.
    pub stderr: String,
}

impl ToolOutput {
    /// stdout, lossily decoded.
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stdout and stderr together (stdout first), lossily decoded.
    pub fn combined(&self) -> String {
        let mut s = self.stdout_str();
        if !self.stderr.is_empty() {
            if !s.is_empty() && !s.ends_with('\n') {
                s.push('\n');
            }
            s.push_str(&self.stderr);
        }
        s
    }

    /// A multi-line description for error messages: command, status, stdout, stderr.
    pub fn describe(&self) -> String {
        describe_output(&self.command, &self.status, &self.stdout, &self.stderr)
    }
}

fn describe_output(command: &str, status: &ExitStatus, stdout: &[u8], stderr: &str) -> String {
    let mut s = format!("command: {command}\nstatus: {status}");
    let out = String::from_utf8_lossy(stdout);
    let out = limit(&out, 8000);
    s.push_str(&format!("\n--- stdout ---\n{}", out.trim_end()));
    s.push_str(&format!("\n--- stderr ---\n{}", limit(stderr, 8000).trim_end()));
    s
}

/// Keeps the end of a long text (the end is usually where the error is).
fn limit(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("[... {} bytes cut ...]\n{}", start, &s[start..])
}

/// Quotes one word for a shell, only when needed.
pub fn shell_quote(word: &OsStr) -> String {
    let s = word.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The command line of `cmd`, shell-quoted.
pub fn command_line(cmd: &Command) -> String {
    let mut words = vec![shell_quote(cmd.get_program())];
    words.extend(cmd.get_args().map(shell_quote));
    words.join(" ")
}

/// Runs `cmd` to completion with stdin closed and captures its output. Fails when it cannot
/// be started or exits non-zero; the error names the command line and shows stdout and stderr.
pub fn run_tool(cmd: &mut Command) -> Result<ToolOutput> {
    let out = run_tool_unchecked(cmd)?;
    if !out.status.success() {
        bail!("external command failed\n{}", out.describe());
    }
    Ok(out)
}

/// Like [`run_tool`] but returns the output whatever the exit status (still fails when the
/// command cannot be started).
pub fn run_tool_unchecked(cmd: &mut Command) -> Result<ToolOutput> {
    let command = command_line(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("cannot start `{command}` (is it installed?)"))?;
    Ok(ToolOutput {
        command,
        status: output.status,
        stdout: output.stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Like [`run_tool_unchecked`], with `input` written to the command's stdin (how secrets are
/// handed to cryptsetup: never as arguments).
pub fn run_tool_with_input(cmd: &mut Command, input: &[u8]) -> Result<ToolOutput> {
    use std::io::Write;
    let command = command_line(cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{command}` (is it installed?)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // An early exit closes the pipe; the exit status tells the story.
        let _ = stdin.write_all(input);
    }
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{command}`"))?;
    Ok(ToolOutput {
        command,
        status: output.status,
        stdout: output.stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Shorthand: runs `program args...` and returns its stdout as a string.
pub fn tool<I, S>(program: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Ok(run_tool(Command::new(program).args(args))?.stdout_str())
}
