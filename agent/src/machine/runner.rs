//! The one way external commands are run: the whole command line is logged and goes into the
//! error together with the command's stderr.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

pub fn describe(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(command.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            format!("'{a}'")
        } else {
            a.into_owned()
        }
    }));
    words.join(" ")
}

/// Runs a command to completion; its output is returned, and on failure put into the error.
pub fn run(command: &mut Command) -> Result<String> {
    let line = describe(command);
    log::info!("running: {line}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting `{line}`"))?;
    checked(&line, output)
}

fn checked(line: &str, output: std::process::Output) -> Result<String> {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let said: &str = if stderr.trim().is_empty() {
            &stdout
        } else {
            &stderr
        };
        bail!("`{line}` failed ({}): {}", output.status, one_line(said));
    }
    Ok(stdout)
}

/// A command's output as one line: the console prints whole lines, each with the agent's
/// prefix, and an error is one of them.
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines.join(" | ")
}

/// Like [`run`], with `input` on the command's stdin: the way secrets reach a command (never its
/// arguments, which /proc shows to everyone and the log keeps). Only the command line is logged.
pub fn run_with_input(command: &mut Command, input: &[u8]) -> Result<String> {
    use std::io::Write;
    let line = describe(command);
    log::info!("running: {line}");
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{line}`"))?;
    let mut stdin = child.stdin.take().context("opening the command's stdin")?;
    // A command that exits early closes the pipe; its status says why, so a write error here
    // is not the interesting one.
    let _ = stdin.write_all(input);
    drop(stdin);
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{line}`"))?;
    checked(&line, output)
}

/// Runs a long command, handing each line of its stdout and stderr to `on_line` as it comes,
/// so the console shows progress and the log keeps everything.
pub fn run_streaming(command: &mut Command, on_line: &(dyn Fn(&str) + Sync)) -> Result<()> {
    let line = describe(command);
    log::info!("running: {line}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{line}`"))?;
    let stdout = child.stdout.take().context("capturing stdout")?;
    let stderr = child.stderr.take().context("capturing stderr")?;
    let last_lines = std::sync::Mutex::new(Vec::<String>::new());
    std::thread::scope(|scope| {
        for stream in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let last_lines = &last_lines;
            scope.spawn(move || {
                for text in BufReader::new(stream).lines().map_while(Result::ok) {
                    on_line(&text);
                    if let Ok(mut lines) = last_lines.lock() {
                        lines.push(text);
                        let excess = lines.len().saturating_sub(5);
                        lines.drain(..excess);
                    }
                }
            });
        }
    });
    let status = child.wait().with_context(|| format!("waiting for `{line}`"))?;
    if !status.success() {
        let tail = last_lines.lock().map(|l| l.join(" | ")).unwrap_or_default();
        bail!("`{line}` failed ({status}); last output: {tail}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_names_the_command_and_stderr() {
        let err = run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("sh -c 'echo oops >&2; exit 3'"), "{text}");
        assert!(text.contains("oops"), "{text}");
    }

    #[test]
    fn streaming_sees_every_line() {
        let seen = std::sync::Mutex::new(Vec::new());
        run_streaming(Command::new("sh").args(["-c", "echo a; echo b >&2"]), &|l| {
            seen.lock().unwrap().push(l.to_string())
        })
        .unwrap();
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        assert_eq!(seen, ["a", "b"]);
        assert!(run_streaming(Command::new("false").arg("x"), &|_| {}).is_err());
    }

    #[test]
    fn input_goes_to_stdin_not_the_error() {
        let out = run_with_input(Command::new("sh").args(["-c", "cat"]), b"secret").unwrap();
        assert_eq!(out, "secret");
        let err = run_with_input(Command::new("sh").args(["-c", "exit 2"]), b"secret").unwrap_err();
        assert!(!format!("{err:#}").contains("secret"), "{err:#}");
    }
}
